"""Triton kernels of lmfast (installed as lmfast.kernels). Launchers follow the contracts of
csrc/ops.h: inputs are validated and contiguous; nothing here checks user input."""

from .attention import attention_bwd, attention_fwd
from .norm import layer_norm_bwd, layer_norm_fwd, rms_norm_bwd, rms_norm_fwd
from .softmax import softmax_bwd, softmax_fwd

__all__ = ["attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd", "softmax_fwd", "softmax_bwd"]
