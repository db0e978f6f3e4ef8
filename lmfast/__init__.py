"""lmfast: fused LayerNorm/RMSNorm, softmax and flash attention kernels for PyTorch, in C++
for the CPU and Triton for the GPU, behind one torch.library-native API.

    lmfast.ops.layer_norm / rms_norm / softmax / attention    functional ops
    lmfast.nn.LayerNorm / RMSNorm / Softmax / Attention       modules
    lmfast.nn.MultiheadAttention                              torch.nn.MultiheadAttention drop-in
    lmfast.patch(model) / lmfast.unpatch(model)               swap a model's modules in place
    AutoModel.from_pretrained(..., attn_implementation="lmfast")   (registered on import)
    lmfast.backends()                                         what runs here, and why not
"""

import hashlib
from pathlib import Path

from . import nn, ops, reference
from ._backends import BackendStatus, backends
from .integrations import PatchReport, patch, unpatch

__version__ = "0.1.0"


def compile_cache_tag(package_dir: Path = Path(__file__).resolve().parent) -> str:
    """lmfast's part of torch.compile's cache key: a digest of the files that define lmfast's
    ops' schemas and what they decompose into (csrc/ops.cpp, csrc/api.cpp: the C++ ops, their
    decompositions and autograd; lmfast/ops/*.py: the Triton ops' and the Python glue).
    torch.compile's on-disk caches (FX graph, AOTAutograd) key a graph by torch's state and the
    graph's code, which names lmfast's public ops but holds neither their schemas nor the kernel
    ops they decompose into: a graph cached under another lmfast called layer_norm_bwd without
    its new eps ("missing value for argument 'eps'"), and attention_bwd with a (B, Hq, Sq) lse
    where it now takes (2, B, Hq, Sq) row stats. (A version number bumped by hand did this
    before, and two schema changes went by without a bump.) ~0.2 ms at import."""
    csrc = package_dir / "_csrc"  # installed
    if not csrc.is_dir():
        csrc = package_dir.parent / "csrc"  # source checkout
    digest = hashlib.sha256(__version__.encode())
    for path in (csrc / "ops.cpp", csrc / "api.cpp", *sorted((package_dir / "ops").glob("*.py"))):
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"(absent)")
    return f"lmfast-{digest.hexdigest()[:12]}"


def _tag_compile_caches() -> None:
    import torch.compiler.config as compiler_config  # (light: does not import dynamo)

    tag = compile_cache_tag()
    if tag not in compiler_config.cache_key_tag.split("+"):
        compiler_config.cache_key_tag = "+".join(t for t in (compiler_config.cache_key_tag, tag) if t)


_tag_compile_caches()
__all__ = ["ops", "nn", "reference", "backends", "BackendStatus", "patch", "unpatch", "PatchReport", "__version__"]
