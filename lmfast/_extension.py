"""Loads lmfast's C++ kernels, registered as torch.ops.lmfast_C.*.

Two libraries make them: lmfast._C (the ops, their checks and autograd) and one kernel
library, lmfast._cpu_<level>, of the ISA level this CPU runs best (lmfast/_build_flags.py:
avx512bf16, avx512, avx2, default), which _C forwards the kernel ops to. LMFAST_CPU_ISA=<level> forces a
level (an error if the CPU cannot run it, or it was not built).

Two ways in, tried in order:
1. ahead of time: `lmfast._C` and the kernel libraries, built by setup.py when torch was
   importable at install time; used only if built against the torch that is running;
2. first use: the sources installed as lmfast/_csrc are compiled with ninja into a per-user
   cache (LMFAST_CACHE_DIR, default ~/.cache/lmfast) keyed by torch version, sources and flags
   (_C and the one level this CPU needs). One line on stderr says so; later runs load the
   cached build.

If both fail, the "cpu" backend is unavailable and `status()` says why.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.machinery
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
    location: str | None = None  # lmfast._C's path, when loaded
    kernels: str | None = None  # the loaded kernel library's path
    isa: str | None = None  # its ISA level (avx512bf16, avx512, avx2, default, custom)


class KernelChoiceError(RuntimeError):
    """No kernel library can be loaded as asked (LMFAST_CPU_ISA names a level this CPU cannot
    run, or one that was not built)."""


def cpu_levels() -> list[str]:
    """The ISA levels this CPU runs, best first (needs lmfast._C loaded)."""
    return str(torch.ops.lmfast_C.cpu_levels()).split(",")


def _choose_level(built: list[str]) -> str:
    """The kernel level to load, of those built: LMFAST_CPU_ISA's, else this CPU's best."""
    if built == ["custom"]:  # LMFAST_CPU_ARCH build: one library, the user's own -march
        return "custom"
    runs = cpu_levels()
    forced = os.environ.get("LMFAST_CPU_ISA", "").strip().lower()
    if forced:
        if forced not in (*_build_flags.X86_LEVELS, "custom"):
            raise KernelChoiceError(f"LMFAST_CPU_ISA={forced} is not a level: use one of "
                                    f"{', '.join(_build_flags.X86_LEVELS)}")
        if forced not in runs:
            raise KernelChoiceError(f"LMFAST_CPU_ISA={forced}: this CPU runs only {', '.join(runs)}")
        if forced not in built:
            raise KernelChoiceError(f"LMFAST_CPU_ISA={forced}: not built (built: {', '.join(built)})")
        return forced
    for level in runs:
        if level in built:
            return level
    raise KernelChoiceError(f"no kernel library this CPU runs ({', '.join(runs)}) was built "
                            f"(built: {', '.join(built)})")


def _load_kernels(path: Path, level: str, how: str, location: str) -> ExtensionStatus:
    torch.ops.lmfast_C.load_cpu_kernels(str(path))
    forced = " (LMFAST_CPU_ISA)" if os.environ.get("LMFAST_CPU_ISA") else ""
    return ExtensionStatus(True, f"{how} ({_build_info()}); kernels for {level}{forced}, this CPU "
                                 f"runs {', '.join(cpu_levels())}", location, str(path), level)


def _aot_kernel_libraries() -> dict[str, Path]:
    """level -> path of the kernel libraries installed beside lmfast._C."""
    pkg = Path(__file__).resolve().parent
    found = {}
    for f in pkg.glob("_cpu_*"):
        name = f.name.split(".", 1)[0]
        if any(f.name.endswith(sfx) for sfx in importlib.machinery.EXTENSION_SUFFIXES):
            found[name[len("_cpu_"):]] = f
    return found


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
    libraries = _aot_kernel_libraries()
    if not libraries:
        return ExtensionStatus(False, "lmfast._C is installed without its kernel libraries "
                                      "(lmfast/_cpu_*.so); reinstall lmfast")
    try:
        level = _choose_level(sorted(libraries))
        return _load_kernels(libraries[level], level, "lmfast._C, built at install time",
                             importlib.import_module("lmfast._C").__file__)
    except (KernelChoiceError, RuntimeError) as e:
        return ExtensionStatus(False, str(e).splitlines()[0])


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

    digest = hashlib.sha256(torch.__version__.encode())
    for f in sorted(src.rglob("*")):
        if f.suffix in (".h", ".cpp"):
            digest.update(f.name.encode() + f.read_bytes())
    levels = _build_flags.kernel_levels()
    digest.update(repr(sorted(levels.items())).encode())
    key = digest.hexdigest()[:16]
    announced = False

    def build(name: str, sources, cflags) -> Path:
        # One cached library: compiled unless present, loaded with torch.ops.load_library.
        build_dir = cache_root() / f"{name}_{key}"

        def announce():
            nonlocal announced
            if not announced:
                print(f"lmfast: compiling the C++ CPU kernels for torch {torch.__version__} "
                      f"(first use, about a minute) into {cache_root()}", file=sys.stderr, flush=True)
                announced = True

        return _cached_build(build_dir, f"{name}_{key}", announce, lambda: cpp_extension.load(
            name=f"{name}_{key}", sources=[str(src / s) for s in sources], extra_cflags=cflags,
            extra_ldflags=_build_flags.CPU_LINK_ARGS, build_directory=str(build_dir), is_python_module=False,
            verbose=False))

    try:
        core = build("lmfast_C", _build_flags.CORE_SOURCES, _build_flags.core_compile_args(torch.__version__))
        level = _choose_level(list(levels))  # only the level this CPU loads is compiled
        kernels = build(f"lmfast_cpu_{level}", _build_flags.KERNEL_SOURCES,
                        _build_flags.kernel_compile_args(torch.__version__, level))
        return _load_kernels(kernels, level, f"built on first use in {cache_root()}", str(core))
    except KernelChoiceError as e:
        return ExtensionStatus(False, str(e))
    except Exception as e:  # no compiler, no ninja, compile error: report, don't crash
        return ExtensionStatus(False, f"first-use build failed: {_why(e)}")


def _cached_build(build_dir: Path, name: str, announce, build_and_load) -> Path:
    """Builds (unless cached) and loads the library `name` in build_dir, safely when several
    processes start at once: they take turns on a file lock, which the kernel releases if its
    holder dies, so a killed build never blocks the next one (torch's own lock file, which a
    killed build leaves behind and which would make every later build wait forever, is removed
    while holding it). A library is trusted only with the marker written after it last built
    and loaded (its size): a build killed while linking leaves a truncated file that ninja
    takes as up to date and that crashes the process on loading (SIGBUS), so such a library
    is deleted and rebuilt. One that still fails to load is rebuilt once."""
    import fcntl

    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}.so"
    marker = build_dir / f"{name}.so.complete"
    with open(build_dir / "lmfast.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)  # torch's, from a build that was killed
        if library.exists() and not (marker.exists() and marker.read_text() == str(library.stat().st_size)):
            print(f"lmfast: the cached {library.name} is incomplete (a build was interrupted); rebuilding it",
                  file=sys.stderr, flush=True)
            library.unlink()
        if not library.exists():
            announce()
        try:
            build_and_load()
        except OSError as e:
            if not library.exists():
                raise
            print(f"lmfast: the cached {library.name} does not load ({str(e).splitlines()[0][:120]}); "
                  "rebuilding it", file=sys.stderr, flush=True)
            library.unlink()
            build_and_load()
        marker.write_text(str(library.stat().st_size))
    return library


def _why(e: Exception) -> str:
    """The telling part of a build error: the compiler's "error:" lines if any, else the
    exception's first line."""
    text = str(e).strip()
    errors = [line.strip() for line in text.splitlines() if "error:" in line]
    detail = "; ".join(errors[:3]) if errors else (text.splitlines()[0] if text else "")
    return f"{type(e).__name__}: {detail[:400]}"


def bf16_attention_unit() -> str | None:
    """What the loaded CPU kernels multiply bfloat16 attention tiles on: "amx", "avx512bf16"
    (both through oneDNN's brgemm) or "sgemm" (widened to float32); None without the extension."""
    if not status().loaded:
        return None
    return str(torch.ops.lmfast_C.bf16_attention_unit())


@functools.cache
def status() -> ExtensionStatus:
    """Loads the extension once per process and reports how (or why not)."""
    if os.environ.get("LMFAST_DISABLE_CPP") == "1":
        return ExtensionStatus(False, "disabled by LMFAST_DISABLE_CPP=1")
    aot = _load_ahead_of_time()
    if aot is not None:
        return aot
    return _load_first_use()


# ---- the CUDA kernels (lmfast._cuda) --------------------------------------------------------

# Shown wherever the CUDA backend is described until a GPU run has checked it (issue 13): the
# tests and benchmarks of scripts/gpu_check.sh, results committed under benchmarks/results/.
CUDA_UNVERIFIED = "not yet verified on a GPU"


def _cuda_build_info() -> str:
    return str(torch.ops.lmfast_C.cuda_build_info())


def _cuda_build_error_file() -> Path:
    """Where setup.py leaves the reason its CUDA compile failed (_build_flags.CUDA_BUILD_ERROR_FILE)."""
    return Path(__file__).resolve().parent / _build_flags.CUDA_BUILD_ERROR_FILE


def _load_cuda_first_use() -> ExtensionStatus:
    """Compiles lmfast._cuda into the cache (as the CPU kernels' first-use build) and loads it."""
    from torch.utils import cpp_extension

    src = _source_dir()
    if src is None:
        return ExtensionStatus(False, "lmfast._cuda is not installed and its sources (lmfast/_csrc) are missing")
    cpp_extension.CUDA_HOME = _build_flags.cuda_home(cpp_extension.CUDA_HOME)  # (as setup.py)
    if cpp_extension.CUDA_HOME is None:
        return ExtensionStatus(False, f"lmfast._cuda was not built at install time and no nvcc is found to "
                                      f"build it now (install the CUDA {torch.version.cuda} toolkit or set "
                                      "CUDA_HOME, then reinstall lmfast)")
    archs = _build_flags.cuda_archs()
    digest = hashlib.sha256((torch.__version__ + ";".join(archs)).encode())
    for f in sorted((src / "cuda").glob("*")):
        digest.update(f.name.encode() + f.read_bytes())
    name = f"lmfast_cuda_{digest.hexdigest()[:16]}"
    build_dir = cache_root() / name
    args = _build_flags.cuda_compile_args(torch.__version__, archs)
    try:
        _cached_build(build_dir, name, lambda: print(
            f"lmfast: compiling the CUDA kernels for torch {torch.__version__} (first use, a few minutes) into "
            f"{cache_root()}", file=sys.stderr, flush=True), lambda: cpp_extension.load(
                name=name, sources=[str(src / s) for s in _build_flags.CUDA_SOURCES], extra_cflags=args["cxx"],
                extra_cuda_cflags=args["nvcc"], build_directory=str(build_dir), is_python_module=False,
                verbose=False))
    except Exception as e:
        return ExtensionStatus(False, f"first-use build of the CUDA kernels failed: {_why(e)}")
    return ExtensionStatus(True, f"built on first use in {cache_root()} ({_cuda_build_info()}); {CUDA_UNVERIFIED}",
                           str(build_dir / f"{name}.so"))


@functools.cache
def cuda_status() -> ExtensionStatus:
    """Loads lmfast._cuda (the CUDA kernels, registered for the kernel ops' CUDA key) once per
    process, after lmfast._C, and reports how or why not."""
    if torch.version.cuda is None:
        return ExtensionStatus(False, f"this torch ({torch.__version__}) is a CPU build")
    if not torch.cuda.is_available():
        return ExtensionStatus(False, "no CUDA device is visible")
    core = status()
    if not core.loaded:
        return ExtensionStatus(False, f"needs lmfast._C, which did not load: {core.detail}")
    try:
        module = importlib.import_module("lmfast._cuda")
    except ModuleNotFoundError:
        failed = _cuda_build_error_file()
        if failed.is_file():  # (not retried on first use: it would fail again, minutes a process)
            return ExtensionStatus(False, f"the CUDA kernels did not compile when lmfast was installed "
                                          f"({failed.read_text().strip()}); fix that and reinstall lmfast")
        loaded = _load_cuda_first_use()
    except ImportError as e:  # built against another torch or CUDA: undefined symbols
        return ExtensionStatus(False, f"lmfast._cuda does not load under torch {torch.__version__} (CUDA "
                                      f"{torch.version.cuda}): {str(e).splitlines()[0][:200]}; it was built "
                                      "for another torch: reinstall lmfast (pip install --no-build-isolation .)")
    else:
        info = _cuda_build_info()
        if _torch_of(info) != torch.__version__:
            return ExtensionStatus(False, f"lmfast._cuda was built for torch {_torch_of(info)} but torch "
                                          f"{torch.__version__} is running; reinstall lmfast")
        loaded = ExtensionStatus(True, f"lmfast._cuda, built at install time ({info}); {CUDA_UNVERIFIED}",
                                 module.__file__)
    if loaded.loaded:
        from .ops import attention

        attention.register_cuda_backward()
    return loaded
