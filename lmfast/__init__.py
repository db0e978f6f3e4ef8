"""lmfast: fused LayerNorm/RMSNorm, softmax (and soon attention) kernels for PyTorch, in
C++ for the CPU and Triton for the GPU, behind one torch.library-native API.

    lmfast.ops.layer_norm / rms_norm / softmax     functional ops
    lmfast.nn.LayerNorm / RMSNorm / Softmax        module drop-ins
    lmfast.backends()                              what runs here, and why not
"""

from . import nn, ops, reference
from ._backends import BackendStatus, backends

__version__ = "0.1.0"
__all__ = ["ops", "nn", "reference", "backends", "BackendStatus", "__version__"]
