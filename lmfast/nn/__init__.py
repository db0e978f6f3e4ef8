"""nn.Module drop-ins built on lmfast.ops."""

from .attention import Attention, MultiheadAttention
from .norm import HFLayerNorm, LayerNorm, LayerNorm1P, RMSNorm, TorchRMSNorm
from .softmax import Softmax

__all__ = ["Attention", "MultiheadAttention", "HFLayerNorm", "LayerNorm", "LayerNorm1P", "RMSNorm", "Softmax", "TorchRMSNorm"]
