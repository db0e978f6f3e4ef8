"""softmax(scale * x + mask) with optional causal masking, fused in one pass.

Layers as in norm.py: CPU tensors go through the C++ public op lmfast_C::softmax; Triton
through the checks here and lmfast_triton::softmax_{fwd,bwd}. Kernels see x as a contiguous
(B, H, M, N) tensor with softmax over N, and the mask expanded to that shape through strides
(a broadcast mask is never materialized).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from . import _autocast, _checks
from ._common import (as_rows, broadcast_mask_grad, cpp_ops, on_cpp_path, resolve_backend, triton_kernels, triton_op,
                      upstream_grad)


def softmax(x: Tensor, dim: int = -1, scale: float = 1.0, mask: Tensor | None = None,
            causal: bool = False, *, backend: str = "auto") -> Tensor:
    """softmax(scale * x + mask) along `dim`.

    mask: additive (x's dtype) or boolean (True = keep), broadcastable to x.
    causal: over the last two dims (M, N) of x, query i keeps keys j <= i + N - M
        (bottom-right aligned, as KV-cache decoding needs; SDPA's is_causal is top-left
        aligned when M != N). Needs dim=-1.
    Rows with every entry masked give zeros, not NaN.
    """
    if (type(dim) is int and type(scale) is float and type(causal) is bool and (mask is None or isinstance(mask, Tensor))
            and on_cpp_path(backend, x)):
        return cpp_ops().softmax.default(x, dim, scale, mask, causal)  # checks its arguments
    if _autocast.any_enabled() and _autocast.runs_in_float32("softmax", x):  # as torch's softmax (CUDA)
        x, mask = _autocast.cast(torch.float32, x, mask)
    _checks.floating_tensor("x", x)
    d = _checks.dim_index(dim, x.dim())
    scale = _checks.real_number("scale", scale)
    _checks.mask_for(mask, x)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and (x.dim() < 2 or d != x.dim() - 1):
        raise ValueError(f"causal=True masks over the last two dims and needs dim=-1 and x with "
                         f">= 2 dims; got dim={dim} for x of shape {tuple(x.shape)}")
    impl = resolve_backend(backend, "softmax", x)
    if impl == "torch":
        with _autocast.off(x):
            return reference.softmax(x, dim, scale, mask, causal)
    if impl in ("cpu", "cuda"):  # the C++ op (CPU or CUDA kernels, by device)
        return cpp_ops().softmax.default(x, d, scale, mask, causal)

    last = x.dim() - 1
    xm = x.movedim(d, last)  # (..., N) with the softmax dim last
    shape4 = _as_4d(xm.shape)
    x4 = xm.reshape(shape4).contiguous()  # (B, H, M, N)
    mask4 = None
    if mask is not None:
        mask4 = mask.expand(x.shape).movedim(d, last).reshape(shape4)  # a view unless unmergeable
        if mask4.stride(-1) not in (0, 1) and mask4.shape[-1] > 1:
            mask4 = mask4.contiguous()  # kernels read mask rows with unit or zero stride
    y4 = triton_op("softmax_fwd", x4, mask4, scale, causal)
    return y4.view(xm.shape).movedim(last, d)


def _as_4d(shape: torch.Size) -> tuple[int, int, int, int]:
    """(..., M, N) -> (B, H, M, N): missing leading dims are 1, extra ones merge into B
    (as csrc/api.cpp's softmax does for the C++ kernels)."""
    dims = [1] * max(0, 4 - len(shape)) + list(shape)
    return (math.prod(dims[:-3]), dims[-3], dims[-2], dims[-1])


# ---- Triton ops (contracts as in csrc/ops.h) ---------------------------------------------

@torch.library.custom_op("lmfast_triton::softmax_fwd", mutates_args=())
def _(x: Tensor, mask: Tensor | None, scale: float, causal: bool) -> Tensor:
    return triton_kernels().softmax_fwd(x, mask, scale, causal)


@torch.library.custom_op("lmfast_triton::softmax_bwd", mutates_args=())
def _(dy: Tensor, y: Tensor, scale: float) -> Tensor:
    return triton_kernels().softmax_bwd(dy, y, scale)


# ---- fake impls, shared by both namespaces; the Triton ops' autograd -----------------------

def _softmax_fwd_fake(x, mask, scale, causal):
    return torch.empty_like(x)


def _softmax_bwd_fake(dy, y, scale):
    return torch.empty_like(y)


def _softmax_setup(ctx, inputs, output):
    x, mask, scale, causal = inputs
    ctx.scale = scale
    ctx.save_for_backward(output, mask)


def register_fakes(ns: str) -> None:
    """Fake impls of ns::softmax_{fwd,bwd} (lmfast_C or lmfast_triton)."""
    torch.library.register_fake(f"{ns}::softmax_fwd", _softmax_fwd_fake)
    torch.library.register_fake(f"{ns}::softmax_bwd", _softmax_bwd_fake)


def _register_triton_autograd() -> None:
    """Autograd of lmfast_triton::softmax_fwd (the C++ op's is in csrc/api.cpp)."""
    ops = torch.ops.lmfast_triton

    def softmax_backward(ctx, dy):
        y, mask = ctx.saved_tensors
        need_x, need_mask = ctx.needs_input_grad[:2]
        y2, dy2 = as_rows(y), as_rows(upstream_grad(dy, y))  # (rows, N)
        if not need_mask:
            return ops.softmax_bwd(dy2, y2, ctx.scale).view(y.shape), None, None, None
        # d(loss)/d(logits) is also the additive mask's gradient (summed over its broadcast
        # dims by autograd's expand backward); x's gradient is that times scale.
        if y.dtype in (torch.float32, torch.float64):
            dz = ops.softmax_bwd(dy2, y2, 1.0).view(y.shape)
            dmask = broadcast_mask_grad(dz, mask, y.dtype, softmax_invariant=True)
            return (dz * ctx.scale if need_x else None), dmask, None, None
        # 16-bit: y renormalized in float32 (rounded, it sums to 1 +- 1e-3 and a row's dz would
        # not cancel), then the mask's gradient reduced before rounding (broadcast_mask_grad)
        y32 = y2.float()
        row_sum = y32.sum(-1, keepdim=True)
        dz32 = ops.softmax_bwd(dy2.float(), (y32 / torch.where(row_sum == 0, 1.0, row_sum)).contiguous(), 1.0)
        dz32 = dz32.view(y.shape)
        dx = (dz32 * ctx.scale).to(y.dtype) if need_x else None
        return dx, broadcast_mask_grad(dz32, mask, y.dtype, softmax_invariant=True), None, None

    torch.library.register_autograd("lmfast_triton::softmax_fwd", softmax_backward, setup_context=_softmax_setup)


register_fakes("lmfast_triton")
_register_triton_autograd()
