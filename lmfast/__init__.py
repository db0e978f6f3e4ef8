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

# Bumped whenever a kernel op's schema changes (2: the norm backward ops took eps). torch.compile's
# on-disk caches key a graph by torch's state and the graph, not by the schemas of the custom ops
# it calls, so a graph cached under an older lmfast called layer_norm_bwd without its new eps
# ("missing value for argument 'eps'"); the version joins torch.compile's cache key instead.
OPS_SCHEMA_VERSION = 2


def _tag_compile_caches() -> None:
    import torch.compiler.config as compiler_config  # (light: does not import dynamo)

    tag = f"lmfast-ops-v{OPS_SCHEMA_VERSION}"
    if tag not in compiler_config.cache_key_tag.split("+"):
        compiler_config.cache_key_tag = "+".join(t for t in (compiler_config.cache_key_tag, tag) if t)


_tag_compile_caches()
__all__ = ["ops", "nn", "reference", "backends", "BackendStatus", "patch", "unpatch", "PatchReport", "__version__"]
