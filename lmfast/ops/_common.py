"""Small helpers shared by the op files."""

from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor

from .. import _backends
from .._import_hooks import call_after_import


def _resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str:
    return _backends.resolve(backend, op, device, dtype)


# Under torch.compile, the backend choices are evaluated once at trace time: they depend only
# on constants (and the first one may load the extension, which dynamo must not trace). Marked
# when torch._dynamo loads (the mark is an attribute set on the function): importing dynamo
# here would add ~2 s to every `import lmfast`.
def _mark_constant_results() -> None:
    torch.compiler.assume_constant_result(_resolve)
    torch.compiler.assume_constant_result(_backends.runs_cpp)


call_after_import("torch._dynamo", _mark_constant_results)


def resolve_backend(backend: str, op: str, x: Tensor) -> str:
    """The concrete backend ("torch", "cpu", "triton") that runs `op` on x."""
    return _resolve(backend, op, x.device, x.dtype)


def on_cpp_path(backend: str, x: object) -> bool:
    """Whether this call goes straight into the C++ public op: x is a CPU tensor and `backend`
    means the C++ kernels there. The C++ op checks every tensor argument itself, with the
    Python layer's messages; the caller checks that the plain Python arguments have the types
    of the op's schema, else takes the Python path, whose checks name the argument."""
    return isinstance(x, Tensor) and x.is_cpu and _backends.runs_cpp(backend)


def tensors_or_none(*args) -> bool:
    """Whether every argument fits a `Tensor?` of a C++ op's schema (anything else takes the
    Python path, whose checks say what is wrong with it)."""
    for a in args:
        if a is not None and not isinstance(a, Tensor):
            return False
    return True


def cpp_ops():
    """torch.ops.lmfast_C: the C++ public and kernel ops (loaded by resolve_backend / on_cpp_path)."""
    return torch.ops.lmfast_C


def triton_op(name: str, *args):
    """torch.ops.lmfast_triton.<name>(*args), skipping autograd's Python wrapper (~10 us a call,
    which decoding one token at a time pays on every norm and attention) when no argument
    needs a gradient. The compiled path always takes the wrapper: torch.compile traces it."""
    op = getattr(torch.ops.lmfast_triton, name)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():  # what the wrapper does without grad, minus its Python
        return op(*args)


def triton_kernels():
    """lmfast.kernels, imported on first use (importing triton takes a while)."""
    return importlib.import_module("lmfast.kernels")


def as_rows(t: Tensor) -> Tensor:
    """(..., N) -> contiguous (rows, N); a view when t is already contiguous."""
    if t.dim() != 2:
        t = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # not -1: N may be 0
    return t.contiguous()


def upstream_grad(g: Tensor | None, like: Tensor) -> Tensor:
    """An output's incoming gradient as a contiguous tensor shaped like `like` (autograd may
    hand over None for an unused output, or a broadcast view such as expanded ones)."""
    return torch.zeros_like(like, memory_format=torch.contiguous_format) if g is None else g.contiguous()


def broadcast_mask_grad(dz: Tensor, mask: Tensor, dtype: torch.dtype, *, softmax_invariant: bool) -> Tensor:
    """An additive mask's gradient from dz = d(loss)/d(logits), unrounded (float32 for 16-bit
    masks), as csrc/api.cpp's broadcast_mask_grad: summed in dz's dtype over the dims along
    which the (expanded) mask broadcasts (stride 0), at index 0 of those dims and zeros
    elsewhere, in `dtype` (autograd's expand backward then adds exact zeros; rounding each
    element first loses a softmax row's cancellation, and a float16 sum over queries could
    overflow to inf - inf = NaN). softmax_invariant (softmax's mask, not attention's, whose lse
    moves with it): a mask constant along the last dim gets exactly 0 (NaN where the sum is not
    finite), not the float sum's rounding noise."""
    dims = [d for d in range(dz.dim()) if mask.stride(d) == 0 and mask.shape[d] > 1]
    if not dims:
        return dz.to(dtype)
    g = torch.zeros(dz.shape, dtype=dtype, device=dz.device)
    first = g
    for d in dims:
        first = first.narrow(d, 0, 1)
    total = dz.sum(dims, keepdim=True)
    if softmax_invariant and dims[-1] == dz.dim() - 1:
        total = torch.where(total.isfinite(), 0.0, float("nan"))
    first.copy_(total)
    return g
