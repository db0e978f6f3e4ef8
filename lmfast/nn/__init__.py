"""nn.Module drop-ins built on lmfast.ops."""

from .attention import Attention
from .norm import LayerNorm, RMSNorm
from .softmax import Softmax

__all__ = ["Attention", "LayerNorm", "RMSNorm", "Softmax"]
