"""nn.Module drop-ins built on lmfast.ops."""

from .attention import Attention, MultiheadAttention
from .norm import LayerNorm, RMSNorm, TorchRMSNorm
from .softmax import Softmax

__all__ = ["Attention", "MultiheadAttention", "LayerNorm", "RMSNorm", "Softmax", "TorchRMSNorm"]
