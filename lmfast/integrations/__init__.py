"""Model patching: lmfast.patch / lmfast.unpatch (patch.py), driven by one table from module
class to the lmfast replacement; transformers' attention registry (hf.py)."""

from . import hf
from .patch import PatchReport, patch, unpatch

hf.register_when_transformers_loads()  # so attn_implementation="lmfast" works in from_pretrained

__all__ = ["PatchReport", "patch", "unpatch"]
