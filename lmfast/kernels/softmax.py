"""Softmax over the last dim with fused scale, mask and causal masking, in Triton.

x is a contiguous (B, H, M, N) tensor, one program per row (b, h, m):

    z_j = scale * x_j + mask[b, h, m, j]     (boolean mask: z_j = -inf where False)
    z_j = -inf for j > N - M + m             (causal, bottom-right aligned)
    y_j = exp(z_j - max z) / sum_k exp(z_k - max z);   a fully masked row gives y = 0
    backward: dx_j = scale * y_j * (dy_j - sum_k y_k dy_k)

The mask is addressed through its strides (0 along broadcast dims), never materialized.
Rows wider than MAX_BLOCK_N use an online max/sum pass, then a normalizing pass.
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import round_to

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _logits(X, MASK, cols, N, n_visible, scale, stride_mn,
            HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr):
    """scale * x + mask for one block as float32, -inf where masked or past the row."""
    visible = cols < n_visible  # n_visible <= N: causal limit, or N
    z = tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32) * scale
    if HAS_MASK:
        m = tl.load(MASK + cols * stride_mn, mask=visible, other=0)
        if BOOL_MASK:
            visible = visible & (m != 0)
        else:
            z = z + m.to(tl.float32)
    return tl.where(visible, z, NEG_INF)


@triton.jit
def _softmax_fwd_kernel(
    X,              # (B, H, M, N) contiguous input
    Y,              # (B, H, M, N) output
    MASK,           # mask values (additive, or uint8 with 1 = keep)      [HAS_MASK]
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask strides, 0 along broadcast dims
    H, M, N,
    scale,          # multiplies x before the mask is added
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    m = row % M
    h = (row // M) % H
    b = row // (M * H)
    X += row * N
    Y += row * N
    MASK += b * stride_mb + h * stride_mh + m * stride_mm
    if CAUSAL:
        n_visible = tl.minimum(N - M + m + 1, N)  # keys j <= m + N - M; <= 0 when none
    else:
        n_visible = N
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        z = _logits(X, MASK, cols, N, n_visible, scale, stride_mn, HAS_MASK, BOOL_MASK)
        row_max = tl.max(z, axis=0)
        e = tl.exp(z - tl.where(row_max == NEG_INF, 0.0, row_max))  # 0 where z = -inf
        denom = tl.sum(e, axis=0)
        y = e / tl.where(denom == 0.0, 1.0, denom)  # fully masked: e = 0, so y = 0
        tl.store(Y + cols, round_to(y, Y.dtype.element_ty, INTERPRETED), mask=cols < N)
    else:
        # Online pass: per-lane running max and sum of exp(z - running max).
        lane_max = tl.full([BLOCK_N], NEG_INF, dtype=tl.float32)
        lane_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            z = _logits(X, MASK, start + cols, N, n_visible, scale, stride_mn, HAS_MASK, BOOL_MASK)
            new_max = tl.maximum(lane_max, z)
            ref = tl.where(new_max == NEG_INF, 0.0, new_max)
            lane_sum = lane_sum * tl.exp(lane_max - ref) + tl.exp(z - ref)
            lane_max = new_max
        row_max = tl.max(lane_max, axis=0)
        ref = tl.where(row_max == NEG_INF, 0.0, row_max)
        denom = tl.sum(lane_sum * tl.exp(lane_max - ref), axis=0)
        denom = tl.where(denom == 0.0, 1.0, denom)
        for start in range(0, N, BLOCK_N):
            z = _logits(X, MASK, start + cols, N, n_visible, scale, stride_mn, HAS_MASK, BOOL_MASK)
            y = tl.exp(z - ref) / denom  # divide: one rounding, as eager
            tl.store(Y + start + cols, round_to(y, Y.dtype.element_ty, INTERPRETED), mask=start + cols < N)


@triton.jit
def _dz(y, dy, dot, total, scale, RENORMALIZE: tl.constexpr):
    """dx = y (dy - dot) scale; 16-bit y (RENORMALIZE) renormalized to p = y / total first:
    y (dy total - dot) scale / total^2 (csrc/cpu/softmax.cpp says why: rounded to 16 bits, y
    made a peaked row's gradient lose 1 - y_max). 0 for a row of zeros."""
    if RENORMALIZE:
        coef = tl.where(total != 0.0, scale / tl.where(total != 0.0, total * total, 1.0), 0.0)
        return y * (dy * total - dot) * coef
    else:
        return scale * y * (dy - dot)


@triton.jit
def _softmax_bwd_kernel(
    DY, Y,          # (rows, N) upstream gradient, softmax output
    DX,             # (rows, N) output
    N,
    scale,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr, RENORMALIZE: tl.constexpr, INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    DY += row * N
    Y += row * N
    DX += row * N
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        in_row = cols < N
        y = tl.load(Y + cols, mask=in_row, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=in_row, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, axis=0)
        total = tl.sum(y, axis=0)
        tl.store(DX + cols, round_to(_dz(y, dy, dot, total, scale, RENORMALIZE), DX.dtype.element_ty, INTERPRETED),
                 mask=in_row)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_y = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            in_row = start + cols < N
            y = tl.load(Y + start + cols, mask=in_row, other=0.0).to(tl.float32)
            acc += y * tl.load(DY + start + cols, mask=in_row, other=0.0).to(tl.float32)
            acc_y += y
        dot = tl.sum(acc, axis=0)
        total = tl.sum(acc_y, axis=0)
        for start in range(0, N, BLOCK_N):
            in_row = start + cols < N
            y = tl.load(Y + start + cols, mask=in_row, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + cols, mask=in_row, other=0.0).to(tl.float32)
            tl.store(DX + start + cols, round_to(_dz(y, dy, dot, total, scale, RENORMALIZE), DX.dtype.element_ty,
                                                 INTERPRETED), mask=in_row)


def softmax_fwd(x: torch.Tensor, mask, scale: float, causal: bool) -> torch.Tensor:
    B, H, M, N = x.shape
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    block, one_block, warps = _common.row_blocking(N)
    if mask is None:
        mask_arg, strides = x, (0, 0, 0, 0)
    else:
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        strides = tuple(0 if mask.shape[d] == 1 else mask.stride(d) for d in range(4))
    _softmax_fwd_kernel[(B * H * M,)](
        x, y, mask_arg, *strides, H, M, N, scale,
        HAS_MASK=mask is not None, BOOL_MASK=mask is not None and mask.dtype == torch.bool,
        CAUSAL=causal, BLOCK_N=block, ONE_BLOCK=one_block, INTERPRETED=_common.interpreted(), num_warps=warps)
    return y


def softmax_bwd(dy: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    rows, N = y.shape
    dx = torch.empty_like(y)
    if y.numel() == 0:
        return dx
    block, one_block, warps = _common.row_blocking(N)
    _softmax_bwd_kernel[(rows,)](dy, y, dx, N, scale, BLOCK_N=block, ONE_BLOCK=one_block,
                                 RENORMALIZE=y.element_size() == 2, INTERPRETED=_common.interpreted(), num_warps=warps)
    return dx
