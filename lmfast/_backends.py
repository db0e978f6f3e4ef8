"""Which backend runs an op: availability, "auto" selection and LMFAST_BACKEND.

Backends:
  torch   the plain-PyTorch reference (lmfast.reference); runs anywhere, any dtype
  cpu     C++ kernels (csrc/, torch.ops.lmfast_C) on CPU tensors
  triton  Triton kernels (lmfast/kernels/) on CUDA tensors, or on CPU tensors through
          the Triton interpreter when TRITON_INTERPRET=1 (how CI tests them)
  cuda    CUDA C++ kernels (csrc/cuda/, lmfast._cuda) on CUDA tensors, through the same C++
          ops as cpu; the attention backward is Triton's

"auto" picks cpu for CPU tensors; for CUDA tensors, the backend AUTO_ON_CUDA names for the op
and the GPU's architecture, else triton; it falls back to torch, with one warning, when that
backend cannot run. LMFAST_BACKEND=<name> replaces "auto".

The environment (LMFAST_BACKEND, TRITON_INTERPRET) is read once, when lmfast first picks a
backend, not on every call (reading it costs about a microsecond, a tenth of a decode-size
norm); refresh() reads it again and forgets every choice made.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Ops each kernel backend implements; "torch" (the reference) implements every op.
KERNEL_OPS = {
    "cpu": {"layer_norm", "rms_norm", "softmax", "attention"},
    "triton": {"layer_norm", "rms_norm", "softmax", "attention"},
    "cuda": {"layer_norm", "rms_norm", "softmax", "attention"},
}

# "auto" on CUDA tensors: (op, compute capability "9.0") -> (backend, the committed result under
# benchmarks/results/ that shows it right and fastest there). A row is added only from a GPU
# run of scripts/gpu_check.sh; until then the CUDA C++ kernels run only when asked for
# (backend="cuda"), and triton is the default.
AUTO_ON_CUDA: dict[tuple[str, str], tuple[str, str]] = {}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    detail: str  # what runs, or why it cannot

    def __str__(self) -> str:
        return f"{self.name:7s} {'yes' if self.available else 'no ':3s}  {self.detail}"


@functools.cache
def _environment() -> tuple[str, bool]:
    """(LMFAST_BACKEND, whether TRITON_INTERPRET is on), as read at first use or refresh()."""
    return os.environ.get("LMFAST_BACKEND", ""), os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_interpreted() -> bool:
    return _environment()[1]


def refresh() -> None:
    """Reads LMFAST_BACKEND and TRITON_INTERPRET again and forgets every backend choice made
    (which backend runs what, and the backend names that mean the C++ kernels)."""
    global _cpp_names
    _environment.cache_clear()
    _resolved.clear()
    _cpp_names = None


@functools.cache
def _cpu_status() -> BackendStatus:
    from . import _extension, ops

    ext = _extension.status()
    if ext.loaded:
        ops.register_cpp_ops()  # the ops exist now: give them fake impls and autograd
    return BackendStatus("cpu", ext.loaded, ext.detail)


@functools.cache
def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus("triton", False, "triton is not installed (pip install 'lmfast[triton]')")
    try:
        import triton

        importlib.import_module("lmfast.kernels")
    except Exception as e:  # broken install: say so instead of failing every call
        return BackendStatus("triton", False, f"cannot import the Triton kernels: {type(e).__name__}: {e}")
    where = []
    if torch.cuda.is_available():
        where.append(f"CUDA tensors ({torch.cuda.get_device_name()})")
    if triton_interpreted():
        where.append("CPU tensors through the interpreter (TRITON_INTERPRET=1)")
    if not where:
        return BackendStatus("triton", False, f"triton {triton.__version__} is installed but there is "
                                              "no CUDA device (TRITON_INTERPRET=1 runs it on CPU tensors)")
    return BackendStatus("triton", True, f"triton {triton.__version__} on " + " and ".join(where))


@functools.cache
def _cuda_status() -> BackendStatus:
    from . import _extension

    ext = _extension.cuda_status()
    if ext.loaded:
        return BackendStatus("cuda", True, f"{ext.detail} (attention backward: the Triton kernel)")
    return BackendStatus("cuda", False, ext.detail)


def status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus("torch", True, f"PyTorch {torch.__version__} reference (lmfast.reference)")
    if name == "cpu":
        return _cpu_status()
    if name == "triton":
        return _triton_status()
    if name == "cuda":
        return _cuda_status()
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def backends() -> dict[str, BackendStatus]:
    """Every backend, whether it can run here, and what it is or why not."""
    return {name: status(name) for name in BACKENDS}


def _serves(name: str, op: str, device: torch.device, dtype: torch.dtype) -> Exception | None:
    """None if backend `name` can run `op` on (device, dtype), else the error that says why not."""
    st = status(name)
    if not st.available:
        return RuntimeError(f"backend {name!r} is not available: {st.detail}")
    if name != "torch" and op not in KERNEL_OPS[name]:
        return RuntimeError(f"backend {name!r} has no {op} kernel yet")
    if name == "cpu" and device.type != "cpu":
        return ValueError(f"backend 'cpu' runs on CPU tensors, got a tensor on {device}")
    if name == "cuda":
        if device.type != "cuda":
            return ValueError(f"backend 'cuda' runs on CUDA tensors, got a tensor on {device}")
        if dtype not in TRITON_DTYPES:
            return TypeError(f"backend 'cuda' supports float16, bfloat16 and float32, got {dtype}")
    if name == "triton":
        if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not triton_interpreted()):
            return ValueError("backend 'triton' runs on CUDA tensors (or CPU tensors with "
                              f"TRITON_INTERPRET=1), got a tensor on {device}")
        if dtype not in TRITON_DTYPES:
            return TypeError(f"backend 'triton' supports float16, bfloat16 and float32, got {dtype}")
    return None


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"lmfast: {reason}; falling back to the PyTorch reference (backend='torch')",
                  RuntimeWarning, stacklevel=4)


def _cuda_capability(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def _auto(op: str, device: torch.device, dtype: torch.dtype) -> str:
    preferred = {"cpu": "cpu", "cuda": "triton"}.get(device.type)
    if device.type == "cuda" and AUTO_ON_CUDA:
        chosen = AUTO_ON_CUDA.get((op, _cuda_capability(device)))
        if chosen is not None and _serves(chosen[0], op, device, dtype) is None:
            return chosen[0]
    if preferred is None:
        return "torch"
    error = _serves(preferred, op, device, dtype)
    if error is None:
        return preferred
    if not isinstance(error, TypeError):  # float64 on a GPU goes to the reference silently
        _warn_fallback(str(error))
    return "torch"


_resolved: dict[tuple, str] = {}


def resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend that runs `op` on (device, dtype); raises if an explicitly named
    backend cannot. Memoized (see refresh())."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {('auto', *BACKENDS)}, got {type(backend).__name__}")
    key = (backend, op, device, dtype)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve_uncached(backend, op, device, dtype)
    return found


_cpp_names: frozenset[str] | None = None


def runs_cpp(backend: str) -> bool:
    """Whether `backend` ("auto", "cpu", ...) means the C++ kernels for CPU tensors, so that
    a call on CPU tensors can go straight into one torch.ops.lmfast_C op (which checks the
    arguments itself). False where anything else decides: another backend, a C++ build that
    did not load, an LMFAST_BACKEND to apply or to reject. The answer depends on the name and
    the environment only, so it is computed once per name (every op and module forward asks)."""
    global _cpp_names
    if _cpp_names is None:
        names = set()
        if status("cpu").available:
            names.add("cpu")
            if _environment()[0] in ("", "auto", "cpu"):
                names.add("auto")
        _cpp_names = frozenset(names)
    return isinstance(backend, str) and backend in _cpp_names


def _resolve_uncached(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = _environment()[0] or "auto"
        if backend not in (*BACKENDS, "auto"):
            raise ValueError(f"LMFAST_BACKEND must be one of {('auto', *BACKENDS)}, got {backend!r}")
        if backend == "auto":
            return _auto(op, device, dtype)
    error = _serves(backend, op, device, dtype)
    if error is not None:
        raise error
    return backend
