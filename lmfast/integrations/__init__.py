"""Model patching: lmfast.patch / lmfast.unpatch (patch.py), driven by one table from module
class to the lmfast replacement."""

from .patch import PatchReport, patch, unpatch

__all__ = ["PatchReport", "patch", "unpatch"]
