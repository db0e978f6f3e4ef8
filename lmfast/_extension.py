"""Loads lmfast's C++ kernels, registered as torch.ops.lmfast_C.*.

Two ways in, tried in order:
1. ahead of time: `lmfast._C`, built by setup.py when torch was importable at install time;
   used only if it was built against the torch that is running;
2. first use: the sources installed as lmfast/_csrc are compiled with ninja into a per-user
   cache (LMFAST_CACHE_DIR, default ~/.cache/lmfast) keyed by torch version, sources and flags.
   One line on stderr says so; later runs load the cached build.

If both fail, the "cpu" backend is unavailable and `status()` says why.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _build_flags


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    detail: str  # how it was loaded (and its build info), or why it could not be
    location: str | None = None  # the shared library's path, when loaded


def _source_dir() -> Path | None:
    pkg = Path(__file__).resolve().parent
    for candidate in (pkg / "_csrc", pkg.parent / "csrc"):  # installed / source checkout
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def _build_info() -> str:
    return str(torch.ops.lmfast_C.build_info())


def _torch_of(build_info: str) -> str:
    fields = dict(f.split("=", 1) for f in build_info.split(";") if "=" in f)
    return fields.get("torch", "unknown")


def _load_ahead_of_time() -> ExtensionStatus | None:
    """ExtensionStatus if lmfast._C loaded (usable or not); None if absent or unloadable."""
    try:
        importlib.import_module("lmfast._C")
    except ImportError:  # never built, or built against another torch (undefined symbols)
        return None
    info = _build_info()
    if _torch_of(info) != torch.__version__:
        return ExtensionStatus(False, f"lmfast._C was built for torch {_torch_of(info)} but torch "
                                      f"{torch.__version__} is running; reinstall lmfast")
    return ExtensionStatus(True, f"lmfast._C, built at install time ({info})",
                           importlib.import_module("lmfast._C").__file__)


def cache_root() -> Path:
    env = os.environ.get("LMFAST_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lmfast"


def _load_first_use() -> ExtensionStatus:
    src = _source_dir()
    if src is None:
        return ExtensionStatus(False, "the C++ sources (lmfast/_csrc) are not installed")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return ExtensionStatus(False, f"no C++ compiler: {compiler!r} is not on PATH (set CXX, or "
                                      "install g++) to build the C++ CPU kernels")
    from torch.utils import cpp_extension

    sources = [src / s for s in _build_flags.CPU_SOURCES]
    cflags = _build_flags.cpu_compile_args(torch.__version__)
    digest = hashlib.sha256(torch.__version__.encode())
    for f in sorted(src.rglob("*")):
        if f.suffix in (".h", ".cpp"):
            digest.update(f.name.encode() + f.read_bytes())
    digest.update(" ".join(cflags + _build_flags.CPU_LINK_ARGS).encode())
    name = f"lmfast_C_{digest.hexdigest()[:16]}"
    build_dir = cache_root() / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if not (build_dir / f"{name}.so").exists():
            print(f"lmfast: compiling the C++ CPU kernels for torch {torch.__version__} "
                  f"(first use, about a minute) into {build_dir}", file=sys.stderr, flush=True)
        cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=cflags,
                           extra_ldflags=_build_flags.CPU_LINK_ARGS, build_directory=str(build_dir),
                           is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, compile error: report, don't crash
        return ExtensionStatus(False, f"first-use build failed: {_why(e)}")
    return ExtensionStatus(True, f"built on first use in {build_dir} ({_build_info()})",
                           str(build_dir / f"{name}.so"))


def _why(e: Exception) -> str:
    """The telling part of a build error: the compiler's "error:" lines if any, else the
    exception's first line."""
    text = str(e).strip()
    errors = [line.strip() for line in text.splitlines() if "error:" in line]
    detail = "; ".join(errors[:3]) if errors else (text.splitlines()[0] if text else "")
    return f"{type(e).__name__}: {detail[:400]}"


@functools.cache
def status() -> ExtensionStatus:
    """Loads the extension once per process and reports how (or why not)."""
    if os.environ.get("LMFAST_DISABLE_CPP") == "1":
        return ExtensionStatus(False, "disabled by LMFAST_DISABLE_CPP=1")
    aot = _load_ahead_of_time()
    if aot is not None:
        return aot
    return _load_first_use()
