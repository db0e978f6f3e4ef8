"""LayerNorm and RMSNorm over the last dim, forward and backward, in Triton.

One program per row in the forward. RMSNorm is LayerNorm without centering (CENTERED=False:
mean fixed at 0, no bias). Per row, with s = x (+ residual):

    forward:   mu = mean(s) (0 for RMSNorm),  rstd = 1 / sqrt(mean((s - mu)^2) + eps)
               y  = (s - mu) * rstd * w + b,   w = w_offset + weight   (w_offset: RMSNorm only)
    backward:  xhat = (s - mu) * rstd,  g = dy * w
               ds = rstd * (g - mean(g) - xhat * mean(g * xhat))      (mean(g): LayerNorm only)
               dw = sum_rows(dy * xhat),  db = sum_rows(dy)

Rows up to MAX_BLOCK_N wide are held in registers (ONE_BLOCK); wider rows are walked in
blocks, re-read from cache. Math is float32 for every input dtype. Launchers match the C++
contracts in csrc/ops.h.
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import round_to


@triton.jit
def _load_sum(X, RES, RES_OUT, cols, in_row, HAS_RES: tl.constexpr, INTERPRETED: tl.constexpr):
    """One block of s = x (+ residual) as float32. With a residual, s is also stored to RES_OUT,
    and the value returned is s rounded to the storage dtype: what eager `x + r` would give."""
    s = tl.load(X + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(RES + cols, mask=in_row, other=0.0).to(tl.float32)
        s_stored = round_to(s, RES_OUT.dtype.element_ty, INTERPRETED)
        tl.store(RES_OUT + cols, s_stored, mask=in_row)
        s = s_stored.to(tl.float32)
    return s


@triton.jit
def _rstd(sum_d2, mean_d, N, eps):
    """1 / sqrt(var + eps), var = mean(d^2) - mean(d)^2 of d = s - m0. Where d^2 overflows
    (|s| ~ 1e19 and up in float32) both terms can be inf and their difference NaN: the
    variance is then inf (rstd 0, as a two-pass variance gives), not NaN read as 0 (which made
    rstd 1/sqrt(eps) and y ~ 1e32: found by tests/test_fuzz.py). A NaN input keeps var NaN:
    tl.maximum's default drops a NaN operand (max.f32 on NVIDIA GPUs, np.fmax in the
    interpreter), which left RMSNorm rows with a NaN finite but for that element (found by the
    long fuzz profile), so the clamp propagates NaN."""
    var = tl.where(sum_d2 == float("inf"), float("inf"), sum_d2 / N - mean_d * mean_d)
    return 1.0 / tl.sqrt(tl.maximum(var, 0.0, propagate_nan=tl.PropagateNan.ALL) + eps)


@triton.jit
def _load_weight(W, cols, in_row, w_offset, SHIFT_W: tl.constexpr):
    """One block of the scale w_offset + weight as float32 (1 + weight: Gemma's RMSNorm). The
    offset is added only where SHIFT_W (w_offset != 0), so that a -0 weight stays -0."""
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    if SHIFT_W:
        w += w_offset
    return w


@triton.jit
def _store_normalized(d, rstd, W, B, Y, cols, in_row, w_offset, HAS_W: tl.constexpr, SHIFT_W: tl.constexpr,
                      HAS_B: tl.constexpr, INTERPRETED: tl.constexpr):
    """Y = d * rstd * w + b for one block, where d = s - mean."""
    y = d * rstd
    if HAS_W:
        y = y * _load_weight(W, cols, in_row, w_offset, SHIFT_W)
    if HAS_B:
        y = y + tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Y + cols, round_to(y, Y.dtype.element_ty, INTERPRETED), mask=in_row)


@triton.jit
def _norm_fwd_kernel(
    X,        # (rows, N) input
    RES,      # (rows, N) residual added to x                  [HAS_RES]
    W,        # (N,) weight                                     [HAS_W]
    B,        # (N,) bias                                       [HAS_B]
    Y,        # (rows, N) output
    RES_OUT,  # (rows, N) x + residual, the pre-norm sum        [HAS_RES]
    MEAN,     # (rows,) float32 row mean                        [CENTERED]
    RSTD,     # (rows,) float32 1 / sqrt(var + eps)
    N,        # row length
    eps,      # variance epsilon
    w_offset,  # added to the weight                            [SHIFT_W]
    CENTERED: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, SHIFT_W: tl.constexpr,
    HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    RES += row * N
    RES_OUT += row * N
    Y += row * N
    cols = tl.arange(0, BLOCK_N)
    # Mean and variance by the corrected two-pass algorithm (as csrc/cpu/norm.cpp): m0 = mean(s),
    # then d = s - m0 gives mean = m0 + mean(d), accurate to ~eps * std, and
    # var = mean(d^2) - mean(d)^2 without cancellation.
    if ONE_BLOCK:
        in_row = cols < N
        s = _load_sum(X, RES, RES_OUT, cols, in_row, HAS_RES, INTERPRETED)
        if CENTERED:
            m0 = tl.sum(s, axis=0) / N
        else:
            m0 = 0.0
        d = tl.where(in_row, s - m0, 0.0)
        if CENTERED:
            mean_d = tl.sum(d, axis=0) / N
        else:
            mean_d = 0.0
        mean = m0 + mean_d
        rstd = _rstd(tl.sum(d * d, axis=0), mean_d, N, eps)
        _store_normalized(tl.where(in_row, s - mean, 0.0), rstd, W, B, Y, cols, in_row, w_offset, HAS_W, SHIFT_W,
                          HAS_B, INTERPRETED)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            acc += _load_sum(X, RES, RES_OUT, start + cols, start + cols < N, HAS_RES, INTERPRETED)
        if CENTERED:
            m0 = tl.sum(acc, axis=0) / N
        else:
            m0 = 0.0
        if HAS_RES:  # later passes read the stored (rounded) sum
            S = RES_OUT
        else:
            S = X
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            in_row = start + cols < N
            d = tl.where(in_row, tl.load(S + start + cols, mask=in_row, other=0.0).to(tl.float32) - m0, 0.0)
            acc_d += d
            acc += d * d
        if CENTERED:
            mean_d = tl.sum(acc_d, axis=0) / N
        else:
            mean_d = 0.0
        mean = m0 + mean_d
        rstd = _rstd(tl.sum(acc, axis=0), mean_d, N, eps)
        for start in range(0, N, BLOCK_N):
            in_row = start + cols < N
            d = tl.load(S + start + cols, mask=in_row, other=0.0).to(tl.float32) - mean
            _store_normalized(d, rstd, W, B, Y, start + cols, in_row, w_offset, HAS_W, SHIFT_W, HAS_B, INTERPRETED)
    if CENTERED:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _row_stats(MEAN, RSTD, row, CENTERED: tl.constexpr):
    """(mean, rstd) saved by the forward for one row; mean is 0 for RMSNorm."""
    if CENTERED:
        mean = tl.load(MEAN + row)
    else:
        mean = 0.0
    return mean, tl.load(RSTD + row)


@triton.jit
def _grad_terms(DY, X, W, cols, in_row, mean, rstd, w_offset, HAS_W: tl.constexpr, SHIFT_W: tl.constexpr):
    """(dy, xhat, g = dy * w) for one block as float32; all zero outside the row."""
    dy = tl.load(DY + cols, mask=in_row, other=0.0).to(tl.float32)
    x = tl.load(X + cols, mask=in_row, other=0.0).to(tl.float32)
    xhat = tl.where(in_row, (x - mean) * rstd, 0.0)
    g = dy
    if HAS_W:
        g = dy * _load_weight(W, cols, in_row, w_offset, SHIFT_W)
    return dy, xhat, g


@triton.jit
def _store_dx(g, xhat, c1, c2, rstd, DRES, DX, cols, in_row, HAS_DRES: tl.constexpr,
              INTERPRETED: tl.constexpr):
    dx = (g - xhat * c1 - c2) * rstd
    if HAS_DRES:
        dx += tl.load(DRES + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(DX + cols, round_to(dx, DX.dtype.element_ty, INTERPRETED), mask=in_row)


@triton.jit
def _norm_bwd_kernel(
    DY,          # (rows, N) gradient of y
    X,           # (rows, N) the normalized input s
    W,           # (N,) weight                                           [HAS_W]
    MEAN,        # (rows,) float32                                       [CENTERED]
    RSTD,        # (rows,) float32
    DRES,        # (rows, N) gradient of the returned x + residual      [HAS_DRES]
    DX,          # (rows, N) output: gradient of s (= of x and residual)
    DW_PARTIAL,  # (programs, N) float32 zeros: this program's sum of dy * xhat   [W_GRAD]
    DB_PARTIAL,  # (programs, N) float32 zeros: this program's sum of dy          [B_GRAD]
    rows, N,
    rows_per_program,
    eps,         # the forward's eps (as float32: ~3e-8 relative)          [EXACT]
    w_offset,    # added to the weight                                     [SHIFT_W]
    CENTERED: tl.constexpr, HAS_W: tl.constexpr, SHIFT_W: tl.constexpr, HAS_DRES: tl.constexpr,
    W_GRAD: tl.constexpr, B_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr, EXACT: tl.constexpr, INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program  # int64, so row * N below cannot overflow
    row_end = tl.minimum(row_start + rows_per_program, rows)
    cols = tl.arange(0, BLOCK_N)
    DW_PARTIAL += pid * N
    DB_PARTIAL += pid * N
    if EXACT:
        # Rows of <= EXACT_ROW_MAX elements: statistics recomputed and dx formed in float64,
        # split so that nothing cancels (see EXACT_ROW_MAX)
        in_row = cols < N
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float64)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float64)
        for row in range(row_start, row_end):
            off = row * N
            x = tl.load(X + off + cols, mask=in_row, other=0.0).to(tl.float64)
            dy = tl.load(DY + off + cols, mask=in_row, other=0.0).to(tl.float64)
            g = dy
            if HAS_W:
                w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float64)
                if SHIFT_W:
                    w += w_offset
                g = dy * w
            if CENTERED:
                d = tl.where(in_row, x - tl.sum(x, axis=0) / N, 0.0)
                g_mean = tl.sum(g, axis=0) / N
            else:
                d = x
                g_mean = 0.0
            dd = tl.sum(d * d, axis=0)
            dg = tl.sum(d * g, axis=0)
            var = dd / N
            rstd = 1.0 / tl.sqrt(var + eps)
            p = tl.where(dd > 0, dg / tl.where(dd > 0, dd, 1.0), 0.0)  # (no 0 / 0, even unselected)
            if CENTERED:
                spanned = (dd > 0) & (N == 2)
            else:
                spanned = (dd > 0) & (N == 1)
            removed = tl.where(spanned, 0.0, g - g_mean - d * p)
            dx = rstd * (removed + d * p * (eps / (var + eps)))
            if HAS_DRES:
                dx += tl.load(DRES + off + cols, mask=in_row, other=0.0).to(tl.float64)
            tl.store(DX + off + cols, round_to(dx.to(tl.float32), DX.dtype.element_ty, INTERPRETED), mask=in_row)
            dw_acc += dy * d * rstd
            db_acc += dy
        if W_GRAD:
            tl.store(DW_PARTIAL + cols, dw_acc.to(tl.float32), mask=in_row)
        if B_GRAD:
            tl.store(DB_PARTIAL + cols, db_acc.to(tl.float32), mask=in_row)
    elif ONE_BLOCK:
        in_row = cols < N
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            off = row * N
            mean, rstd = _row_stats(MEAN, RSTD, row, CENTERED)
            dy, xhat, g = _grad_terms(DY + off, X + off, W, cols, in_row, mean, rstd, w_offset, HAS_W, SHIFT_W)
            c1 = tl.sum(g * xhat, axis=0) / N
            if CENTERED:
                c2 = tl.sum(g, axis=0) / N
            else:
                c2 = 0.0
            _store_dx(g, xhat, c1, c2, rstd, DRES + off, DX + off, cols, in_row, HAS_DRES, INTERPRETED)
            dw_acc += dy * xhat
            db_acc += dy
        if W_GRAD:
            tl.store(DW_PARTIAL + cols, dw_acc, mask=in_row)
        if B_GRAD:
            tl.store(DB_PARTIAL + cols, db_acc, mask=in_row)
    else:
        for row in range(row_start, row_end):
            off = row * N
            mean, rstd = _row_stats(MEAN, RSTD, row, CENTERED)
            gx_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            g_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                dy, xhat, g = _grad_terms(DY + off, X + off, W, start + cols, start + cols < N, mean, rstd, w_offset,
                                          HAS_W, SHIFT_W)
                gx_acc += g * xhat
                g_acc += g
            c1 = tl.sum(gx_acc, axis=0) / N
            if CENTERED:
                c2 = tl.sum(g_acc, axis=0) / N
            else:
                c2 = 0.0
            for start in range(0, N, BLOCK_N):
                c = start + cols
                in_row = c < N
                dy, xhat, g = _grad_terms(DY + off, X + off, W, c, in_row, mean, rstd, w_offset, HAS_W, SHIFT_W)
                _store_dx(g, xhat, c1, c2, rstd, DRES + off, DX + off, c, in_row, HAS_DRES, INTERPRETED)
                if W_GRAD:  # this program's own partial row: no other program touches it
                    tl.store(DW_PARTIAL + c, tl.load(DW_PARTIAL + c, mask=in_row) + dy * xhat, mask=in_row)
                if B_GRAD:
                    tl.store(DB_PARTIAL + c, tl.load(DB_PARTIAL + c, mask=in_row) + dy, mask=in_row)


def _stat(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.empty(rows, device=x.device, dtype=torch.float32)


def _norm_fwd(x, weight, bias, residual, eps, centered, weight_offset=0.0):
    rows, n = x.shape
    y = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = _stat(x, rows) if centered else x.new_empty(0, dtype=torch.float32)
    rstd = _stat(x, rows)
    if rows == 0 or n == 0:  # nothing to normalize (the statistics of empty rows are unused)
        return y, residual_out, mean, rstd
    block, one_block, warps = _common.row_blocking(n)
    _norm_fwd_kernel[(rows,)](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, residual_out if residual is not None else y,
        mean if centered else rstd, rstd, n, eps, weight_offset,
        CENTERED=centered, HAS_RES=residual is not None, HAS_W=weight is not None, SHIFT_W=weight_offset != 0,
        HAS_B=bias is not None, BLOCK_N=block, ONE_BLOCK=one_block, INTERPRETED=_common.interpreted(), num_warps=warps)
    return y, residual_out, mean, rstd


# Rows of at most this many elements take the backward's float64 path. There dx = rstd (g -
# mean(g) - xhat mean(g xhat)) is mostly cancellation (all of it for LayerNorm at N = 2 and
# RMSNorm at N = 1: dx ~ eps / (var + eps)), which amplifies the float32 rounding of rstd and
# xhat ~var / eps times. So the statistics are recomputed from x and eps in float64 and the sum
# split so that nothing cancels, as csrc/cpu/norm.cpp's norm_bwd_exact_rows explains: with
# d = x - mu and p = (d . g) / (d . d), dx = rstd ((g - mean(g) - d p) + d p eps / (var + eps)),
# the first term exactly 0 where 1 and d span the row.
EXACT_ROW_MAX = 8


def _norm_bwd(dy, x, weight, mean, rstd, dresidual_out, weight_grad, bias_grad, eps, centered, weight_offset=0.0):
    rows, n = x.shape
    dx = torch.empty_like(x)
    programs = _common.reduction_programs(rows, n, x.device)
    dw_partial = torch.zeros(programs if weight_grad else 0, n, device=x.device, dtype=torch.float32)
    db_partial = torch.zeros(programs if bias_grad else 0, n, device=x.device, dtype=torch.float32)
    if rows > 0 and n > 0:
        block, one_block, warps = _common.row_blocking(n)
        _norm_bwd_kernel[(programs,)](
            dy, x, weight if weight is not None else x, mean if centered else rstd, rstd,
            dresidual_out if dresidual_out is not None else dy, dx,
            dw_partial if weight_grad else dx, db_partial if bias_grad else dx,
            rows, n, -(-rows // programs), eps, weight_offset,
            CENTERED=centered, HAS_W=weight is not None, SHIFT_W=weight_offset != 0, HAS_DRES=dresidual_out is not None,
            W_GRAD=weight_grad, B_GRAD=bias_grad, BLOCK_N=block, ONE_BLOCK=one_block,
            EXACT=n <= EXACT_ROW_MAX, INTERPRETED=_common.interpreted(), num_warps=warps)
    # (programs, N) partials -> (N,), summed in float32, rounded once
    dw = dw_partial.sum(0).to(x.dtype) if weight_grad else x.new_empty(0)
    db = db_partial.sum(0).to(x.dtype) if bias_grad else x.new_empty(0)
    return dx, dw, db


def layer_norm_fwd(x, weight, bias, residual, eps):
    return _norm_fwd(x, weight, bias, residual, eps, centered=True)


def layer_norm_bwd(dy, x, weight, mean, rstd, dresidual_out, weight_grad, bias_grad, eps):
    return _norm_bwd(dy, x, weight, mean, rstd, dresidual_out, weight_grad, bias_grad, eps, centered=True)


def rms_norm_fwd(x, weight, residual, eps, weight_offset=0.0):
    y, residual_out, _, rstd = _norm_fwd(x, weight, None, residual, eps, centered=False, weight_offset=weight_offset)
    return y, residual_out, rstd


def rms_norm_bwd(dy, x, weight, rstd, dresidual_out, weight_grad, eps, weight_offset=0.0):
    dx, dw, _ = _norm_bwd(dy, x, weight, None, rstd, dresidual_out, weight_grad, False, eps, centered=False,
                          weight_offset=weight_offset)
    return dx, dw
