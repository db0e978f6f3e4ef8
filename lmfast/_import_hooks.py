"""Run a function right after a module is first imported, without importing it ourselves.

`import lmfast` must stay cheap: it must not import transformers (seconds) or torch._dynamo
(~2 s), yet lmfast has to register with each of them before the user's code uses them."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


class _AfterImport(importlib.abc.MetaPathFinder):
    """One-shot finder: lets the other finders locate `name`, then wraps its loader so that
    `then()` runs once the module has executed."""

    def __init__(self, name: str, then: Callable[[], None]):
        self.name, self.then = name, then

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then(module):
            exec_module(module)
            self.then()

        spec.loader.exec_module = exec_then
        return spec


def call_after_import(name: str, then: Callable[[], None]) -> None:
    """then() now if module `name` is loaded, else as soon as it is (once, however often the
    same (name, then) is asked for)."""
    if name in sys.modules:
        then()
    elif not any(isinstance(f, _AfterImport) and f.name == name and f.then is then for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))
