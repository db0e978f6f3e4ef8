"""lmfast: fused LayerNorm/RMSNorm, softmax and flash attention kernels for PyTorch, in C++
for the CPU and Triton for the GPU, behind one torch.library-native API.

    lmfast.ops.layer_norm / rms_norm / softmax / attention    functional ops
    lmfast.nn.LayerNorm / RMSNorm / Softmax / Attention       modules
    lmfast.nn.MultiheadAttention                              torch.nn.MultiheadAttention drop-in
    lmfast.patch(model) / lmfast.unpatch(model)               swap a model's modules in place
    AutoModel.from_pretrained(..., attn_implementation="lmfast")   (registered on import)
    lmfast.backends()                                         what runs here, and why not
"""

from . import nn, ops, reference
from ._backends import BackendStatus, backends
from .integrations import PatchReport, patch, unpatch

__version__ = "0.1.0"
__all__ = ["ops", "nn", "reference", "backends", "BackendStatus", "patch", "unpatch", "PatchReport", "__version__"]
