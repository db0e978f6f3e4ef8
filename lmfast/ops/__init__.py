"""Functional API. Every op takes backend="auto" | "torch" | "cpu" | "triton" (see
lmfast.backends()); LMFAST_BACKEND overrides "auto". On CPU tensors a call is one C++ op
(torch.ops.lmfast_C.<op>), which checks its arguments itself."""

from . import attention as _attention_module, norm, softmax as _softmax_module
from .attention import attention, attention_varlen
from .norm import layer_norm, rms_norm
from .softmax import softmax

__all__ = ["attention", "attention_varlen", "layer_norm", "rms_norm", "softmax"]


def register_cpp_ops() -> None:
    """Fake impls of the C++ kernel ops (torch.ops.lmfast_C; their autograd is in C++); called
    once, by lmfast._backends, right after the C++ library loads."""
    norm.register_fakes("lmfast_C")
    _softmax_module.register_fakes("lmfast_C")
    _attention_module.register_fakes("lmfast_C")
