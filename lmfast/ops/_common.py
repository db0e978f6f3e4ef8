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


# Under torch.compile, _resolve is evaluated once at trace time: the choice depends only on
# constants. Marked when torch._dynamo loads (the mark is an attribute set on the function):
# importing dynamo here would add ~2 s to every `import lmfast`.
call_after_import("torch._dynamo", lambda: torch.compiler.assume_constant_result(_resolve))


def resolve_backend(backend: str, op: str, x: Tensor) -> str:
    """The concrete backend ("torch", "cpu", "triton") that runs `op` on x."""
    return _resolve(backend, op, x.device, x.dtype)


def backend_ops(backend: str):
    """The custom-op namespace of a kernel backend: torch.ops.lmfast_C (C++ kernels, loaded by
    resolve_backend) or torch.ops.lmfast_triton. Same op names and schemas in both."""
    return torch.ops.lmfast_C if backend == "cpu" else torch.ops.lmfast_triton


def forward_op(backend: str, name: str, *args):
    """backend_ops(backend).<name>(*args), skipping autograd's Python wrapper (~10 us a call,
    which decoding one token at a time pays on every norm and attention) when no argument
    needs a gradient. The compiled path always takes the wrapper: torch.compile traces it."""
    op = getattr(backend_ops(backend), name)
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
