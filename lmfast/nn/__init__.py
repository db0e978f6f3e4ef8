"""nn.Module drop-ins built on lmfast.ops."""

from .norm import LayerNorm, RMSNorm
from .softmax import Softmax

__all__ = ["LayerNorm", "RMSNorm", "Softmax"]
