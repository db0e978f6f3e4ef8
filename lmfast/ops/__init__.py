"""Functional API. Every op takes backend="auto" | "torch" | "cpu" | "triton" (see
lmfast.backends()); LMFAST_BACKEND overrides "auto"."""

from .norm import layer_norm, rms_norm
from .softmax import softmax

__all__ = ["layer_norm", "rms_norm", "softmax"]
