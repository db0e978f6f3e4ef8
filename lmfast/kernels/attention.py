"""Flash attention (FlashAttention-2 algorithm) in Triton: forward, split-K decoding forward,
backward.

q: (B, Hq, Sq, D), k: (B, Hkv, Sk, D), v: (B, Hkv, Sk, Dv), contiguous; query head h reads kv
head h // (Hq // Hkv) (grouped-query attention by index, nothing repeated). v's head dim Dv may
differ from D (DeepSeek's multi-head latent attention: 192 over 128): BLOCK_D tiles D, BLOCK_DV
tiles Dv. Same semantics as csrc/cpu/attention.cpp:

    s = scale * q k^T + mask     (boolean mask: -inf where False; -inf outside the key band)
        with a softcap c (SOFTCAP): s = c tanh(scale * q k^T / c) + mask (Gemma 2)
    key band of query i (bottom-right aligned, position p = i + Sk - Sq):
        causal keeps j <= p,  a window w keeps j > p - w
    o = softmax(s) v;  lse = logsumexp(s);  a row with every key masked gives o = 0, lse = -inf
    dropout (DROPOUT): softmax(s) entries dropped by lmfast.reference.dropout_keep's hash of
        (seed, row, key), the rest times keep_scale = 1 / (1 - p), before v; lse without dropout

Kernels (one program per tile, tiles never leave registers/shared memory):
  _attn_fwd_kernel      program (query block, b*Hq + h): online softmax over the key blocks
                        in the query block's band (blocks outside it are skipped, and so are
                        blocks a boolean mask drops whole: _tile_kept). Packed documents
                        (DOCS): a query block is a run of one document's rows (_document_run),
                        as are the dq kernel's; the dk/dv kernel's key blocks, of its keys.
  _attn_fwd_split_kernel / _attn_combine_kernel   decoding (few query rows per kv head, long
                        cache): the rows of all query heads sharing a kv head form one tile,
                        so K/V are read once per group, and the keys are split over programs
                        whose partial (max, sum, o) are combined afterwards.
  _attn_bwd_delta_kernel  delta = rowsum(do * o)
  _attn_bwd_dq_kernel     program (query block, b*Hq + h): dq (and the mask gradient)
  _attn_bwd_dkdv_kernel   program (key block, b*Hkv + hk): dk, dv, looping over the query heads
                        of its group and the query blocks that can see the key block

backward, recomputing p = exp(s - m) / l (each row's max m and sum l, kept by the forward:
_store_row_stats):   dv = p^T do;  dp = do v^T;
    ds = p ((dp - delta) + dlse);  dq = scale ds k;  dk = scale ds^T q
    (with a softcap, ds is taken through the cap for dq and dk: ds (1 - tanh^2))
    (with dropout: dv = p_dropped^T do and dp = (do v^T) dropped, both times keep_scale)
When one key block holds every key a row can see, that row's p is renormalized to sum to 1
and its delta is taken as rowsum(p * dp) from the block: then dp - delta is exactly 0 where
one key takes all the weight, as in an unfused softmax backward. Rows spanning several key
blocks keep the FlashAttention-2 form, which misses those exact zeros (README: attention,
backward precision); the CPU backward (csrc/cpu/attention.cpp) keeps whole rows instead.

Scores and softmax are float32. 16-bit inputs go to tl.dot as they are (p and ds are rounded
to the input dtype for their products, as eager attention does); float32 inputs use IEEE
float32 products unless torch allows TF32 matmuls. In the Triton interpreter, tl.dot on
bfloat16 gives wrong numbers, so there (UPCAST) operands are widened to float32 first.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from .. import reference
from . import _common
from ._common import round_to

NEG_INF = tl.constexpr(float("-inf"))


# ---- shared pieces -------------------------------------------------------------------------

@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with float32 accumulation."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _maximum_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(x, axis: tl.constexpr, INTERPRETED: tl.constexpr):
    """max over `axis`, NaN where any entry is NaN (tl.max skips NaN: a row whose scores hold
    +inf and NaN then took lse = +inf where the reference's is NaN; found by the fuzz).
    The interpreter runs a reduction with a combine function of ours in Python, one element
    at a time (about a second per 128 x 128 tile: most of the attention tests' time), so there
    the same value comes from its vectorized max and sum: a NaN entry makes the sum NaN."""
    if INTERPRETED:
        return tl.max(x, axis) + tl.sum(tl.where(x != x, x, 0.0), axis)
    else:
        return tl.reduce(x, axis, _maximum_nan)


@triton.jit
def _tanh(x):
    """tanh in float32 from exp alone, so the interpreter runs the same code as a GPU (it has no
    libdevice): Cephes' tanhf, a polynomial below |x| = 0.625 (where 1 - 2 / (e^2x + 1)
    cancels), that formula above; within ~2 ulps of the true value."""
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
              + 1.33314422036e-1) * z - 3.33332819422e-1) * z * x + x
    big = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(x)) + 1.0)  # (|x| past ~44: e^2x = inf, so 1)
    return tl.where(tl.abs(x) < 0.625, small, tl.where(x < 0.0, -big, big))


@triton.jit
def _scores(q, kT, scale, softcap, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The tile's scores before the mask: scale q k^T, capped to softcap tanh(. / softcap) under
    SOFTCAP (as Gemma 2's eager attention: divide, tanh, multiply)."""
    s = _dot(q, kT, UPCAST, PRECISION) * scale
    if SOFTCAP:
        s = _tanh(s / softcap) * softcap
    return s


@triton.jit
def _mix32(x):
    """A 32-bit integer hash of uint32 x (C. Wellons' lowbias32), as lmfast.reference._mix32."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _dropout_keep(SEED, rows, cols, threshold):
    """(rows x cols) True where dropout keeps the entry: lmfast.reference.dropout_keep, rows the
    global rows (b * Hq + h) * Sq + i, cols the key indices, SEED an int64 pointer."""
    seed = tl.load(SEED)
    r = rows.to(tl.int64)
    row_key = _mix32(_mix32((r & 0xFFFFFFFF).to(tl.uint32) ^ (seed & 0xFFFFFFFF).to(tl.uint32))
                     ^ (r >> 32).to(tl.uint32) ^ (seed >> 32).to(tl.uint32))
    bits = _mix32(row_key[:, None] ^ (cols.to(tl.uint32) * 0x9E3779B9)[None, :])
    return bits.to(tl.int64) >= threshold


@triton.jit
def _doc_band(rows, Sq, BANDS):
    """Packed documents: each row's visible keys [lo, hi) from BANDS (empty past Sq)."""
    ok = rows < Sq
    return tl.load(BANDS + rows, mask=ok, other=0), tl.load(BANDS + Sq + rows, mask=ok, other=0)


@triton.jit
def _band_keep(rows, cols, Sq, Sk, window, BANDS, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr):
    """(rows x cols) True where query `rows` may see key `cols`: both in range, and in the
    query's causal/window band (bottom-right aligned: query i sits at key position i + Sk - Sq),
    or under DOCS its band in its document, read from BANDS (_document_bands)."""
    keep = (rows[:, None] < Sq) & (cols[None, :] < Sk)
    if DOCS:
        lo, hi = _doc_band(rows, Sq, BANDS)
        keep = keep & (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    else:
        pos = rows[:, None] + (Sk - Sq)  # key position of each query
        if CAUSAL:
            keep = keep & (cols[None, :] <= pos)
        if WINDOW:
            keep = keep & (cols[None, :] > pos - window)
    return keep


@triton.jit
def _masked_scores(s, rows, cols, MASK, smq, smk, Sq, Sk, window, BANDS,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr, HAS_MASK: tl.constexpr,
                   BOOL_MASK: tl.constexpr):
    """s (rows x cols tile, already scaled) plus the mask, -inf where masked or out of range.

    rows, cols: query and key indices of the tile; MASK points at the mask of the tile's
    (b, h) (or per row, when it is a 2-D pointer block of row bases)."""
    keep = _band_keep(rows, cols, Sq, Sk, window, BANDS, CAUSAL, WINDOW, DOCS)
    if HAS_MASK:
        m = tl.load(MASK + rows[:, None] * smq + cols[None, :] * smk, mask=keep, other=0)
        if BOOL_MASK:
            keep = keep & (m != 0)
        else:
            s = s + m.to(tl.float32)
    return tl.where(keep, s, NEG_INF)


@triton.jit
def _tile_kept(rows, cols, MASK, smq, smk, Sq, Sk, window, BANDS, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               DOCS: tl.constexpr):
    """Whether a boolean mask keeps any key of the tile for any of its rows, within their band.
    A tile it drops whole (another document's keys in packed sequences, a padded stretch) is
    skipped: its scores would all be -inf, whatever q and k hold, so skipping changes no bit.
    (Additive masks never skip: -inf + NaN must stay NaN.)"""
    keep = _band_keep(rows, cols, Sq, Sk, window, BANDS, CAUSAL, WINDOW, DOCS)
    m = tl.load(MASK + rows[:, None] * smq + cols[None, :] * smk, mask=keep, other=0)
    return tl.max(tl.max((keep & (m != 0)).to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _key_range(row_lo, row_hi, Sq, Sk, window, BANDS, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr):
    """[lo, hi): the keys some query in rows [row_lo, row_hi) (row_hi > row_lo) may see, lo a
    multiple of BLOCK_N. (Under DOCS too, both ends of a row's band grow with the row.)"""
    lo = 0
    hi = Sk
    if DOCS:
        lo = tl.load(BANDS + row_lo)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.load(BANDS + Sq + row_hi - 1)
    else:
        if CAUSAL:
            hi = tl.maximum(tl.minimum(Sk, row_hi - 1 + (Sk - Sq) + 1), 0)
        if WINDOW:
            lo = tl.maximum(0, row_lo + (Sk - Sq) - window + 1)
            lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _single_block_rows(rows, start_n, Sq, Sk, window, BANDS, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr):
    """Whether every key each row may see lies in keys [start_n, start_n + BLOCK_N) (under DOCS,
    and below Sk: the key kernel's run of one document passes its end as Sk)."""
    if DOCS:
        lo, hi = _doc_band(rows, Sq, BANDS)
        return (lo >= start_n) & (hi <= tl.minimum(start_n + BLOCK_N, Sk))
    else:
        pos = rows + (Sk - Sq)
        hi = tl.zeros_like(rows) + Sk
        lo = tl.zeros_like(rows)
        if CAUSAL:
            hi = tl.minimum(pos + 1, Sk)
        if WINDOW:
            lo = tl.maximum(pos - window + 1, 0)
    return (lo >= start_n) & (hi <= start_n + BLOCK_N)


@triton.jit
def _document_run(pid, CU, n_docs, BLOCK: tl.constexpr):
    """Under DOCS, program pid's run of rows (or keys) [start, end): inside one document and one
    block-aligned stretch of BLOCK, so that no program mixes documents (and none covers more
    than one document's keys). CU: the table's copy of cu_seqlens (int32, in [0, length]).
    Document d owns programs [P(d), P(d + 1)), P(d) = CU[d] // BLOCK + d, increasing in d: one
    per aligned block its rows meet, and one left empty (start = end) where it ends on a block
    boundary or holds no row. The grid: length // BLOCK + n_docs programs (length = CU[n_docs])."""
    lo = pid * 0
    hi = lo + n_docs - 1
    while lo < hi:  # the last document d with P(d) <= pid
        mid = (lo + hi + 1) // 2
        if tl.load(CU + mid) // BLOCK + mid <= pid:
            lo = mid
        else:
            hi = mid - 1
    block = pid - lo  # the aligned block of this program (P(d) + its index among d's programs - d)
    end = tl.minimum(tl.load(CU + lo + 1), (block + 1) * BLOCK)
    start = tl.minimum(tl.maximum(tl.load(CU + lo), block * BLOCK), end)  # (empty: start = end, inside [0, length])
    return start, end


# ---- forward ---------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_kernel(
    Q, K, V,        # (B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv), contiguous
    O,              # (B, Hq, Sq, Dv) output in (B, Sq, Hq, Dv) memory order (rows Hq * Dv apart)
    LSE,            # (B, Hq, Sq) float32 output
    ROW_MAX, ROW_INV_SUM,  # (B, Hq, Sq) float32 outputs: m and 1 / l, the backward's p = exp(s - m) / l
    MASK,           # mask values (additive, or uint8 with 1 = keep)          [HAS_MASK]
    smb, smh, smq, smk,  # mask strides, 0 along broadcast dims
    Hq, Hkv, Sq, Sk, D, Dv,
    scale, softcap, window,  # softcap: the logit cap c                                  [SOFTCAP]
    SEED, threshold, keep_scale,  # dropout: int64 seed, floor(p * 2^32), 1 / (1 - p)   [DROPOUT]
    BANDS,          # packed documents: the table of _document_bands                      [DOCS]
    n_docs,         # packed documents: their number                                      [DOCS]
    Q_BUCKET, K_BUCKET,  # powers of two of Sq, Sk: autotuning keys only
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr, HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    if DOCS:  # rows [start_m, end_m) of one document (_document_run)
        start_m, end_m = _document_run(tl.program_id(0), BANDS + 2 * Sq + 2 * Sk, n_docs, BLOCK_M)
    else:
        start_m = tl.program_id(0) * BLOCK_M
        end_m = tl.minimum(start_m + BLOCK_M, Sq)
    bh = tl.program_id(1).to(tl.int64)  # b * Hq + h
    h = bh % Hq
    b = bh // Hq
    kv = b * Hkv + h // (Hq // Hkv)
    Q += bh * Sq * D
    O += (b * Sq * Hq + h) * Dv
    LSE += bh * Sq
    ROW_MAX += bh * Sq
    ROW_INV_SUM += bh * Sq
    K += kv * Sk * D
    V += kv * Sk * Dv
    MASK += b * smb + h * smh

    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    row_ok = rows[:, None] < end_m  # (rows past it, another program's, are computed and dropped)
    dim_ok = dims[None, :] < D
    vdim_ok = vdims[None, :] < Dv
    q = tl.load(Q + rows[:, None] * D + dims[None, :], mask=row_ok & dim_ok, other=0.0)  # (M, D)

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)          # running sum of exp(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)  # running sum of exp(s - m_i) v
    lo, hi = _key_range(start_m, end_m, Sq, Sk, window, BANDS, BLOCK_N, CAUSAL, WINDOW, DOCS)
    hi = tl.where(end_m > start_m, hi, lo)  # (an empty run: no keys)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kept = True
        if HAS_MASK and BOOL_MASK:
            kept = _tile_kept(rows, cols, MASK, smq, smk, Sq, Sk, window, BANDS, CAUSAL, WINDOW, DOCS)
        if kept:  # (a tile the mask drops whole changes nothing: skipped)
            key_ok = cols[None, :] < Sk
            kT = tl.load(K + cols[None, :] * D + dims[:, None], mask=key_ok & (dims[:, None] < D), other=0.0)  # (D, N)
            s = _scores(q, kT, scale, softcap, SOFTCAP, UPCAST, PRECISION)
            s = _masked_scores(s, rows, cols, MASK, smq, smk, Sq, Sk, window, BANDS, CAUSAL, WINDOW, DOCS, HAS_MASK,
                               BOOL_MASK)
            m_new = _maximum_nan(m_i, _max_nan(s, 1, INTERPRETED))
            m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet: p = 0
            p = tl.exp(s - m_ref[:, None])
            alpha = tl.exp(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:  # (after l: the sums are of the undropped p)
                p = tl.where(_dropout_keep(SEED, bh * Sq + rows, cols, threshold), p * keep_scale, 0.0)
            v = tl.load(V + cols[:, None] * Dv + vdims[None, :], mask=(cols[:, None] < Sk) & vdim_ok,
                        other=0.0)  # (N, Dv)
            acc = acc * alpha[:, None] + _dot(round_to(p, v.dtype, INTERPRETED), v, UPCAST, PRECISION)
            m_i = m_new

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # fully masked rows: acc = 0, o = 0
    tl.store(O + rows[:, None] * (Hq * Dv) + vdims[None, :], round_to(o, O.dtype.element_ty, INTERPRETED),
             mask=row_ok & vdim_ok)
    lse = tl.where(l_i == 0.0, NEG_INF, m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
    lse = tl.where(m_i == float("inf"), m_i, lse)  # a +inf score: logsumexp is +inf (l is NaN)
    tl.store(LSE + rows, lse, mask=rows < end_m)
    _store_row_stats(ROW_MAX + rows, ROW_INV_SUM + rows, m_i, l_i, rows < end_m)


@triton.jit
def _store_row_stats(ROW_MAX, ROW_INV_SUM, m, l, ok):
    """The softmax's row max m and 1 / l (l = sum of exp(s - m)), from which the backward
    recomputes p = exp(s - m) / l as an unfused softmax does. (Not exp(s - lse): s - lse is
    about log(keys) further from 0 than s - m, so its float32 rounding, which p carries as a
    relative error, is that much larger: dv at 1.18x eager's error over 64 query rows and 1000
    keys, 1.90x over 2 rows and 300 keys, against 0.96x and 0.95x so; benchmarks/results/
    cpu-epyc-zen4-2026-12-06-triton-backward-precision.txt.) Rows that see nothing: m = 0, 1 / l = 0."""
    tl.store(ROW_MAX, tl.where(m == NEG_INF, 0.0, m), mask=ok)
    tl.store(ROW_INV_SUM, tl.where(l == 0.0, 0.0, 1.0 / tl.where(l == 0.0, 1.0, l)), mask=ok)


@triton.jit
def _attn_fwd_split_kernel(
    Q, K, V,        # as _attn_fwd_kernel
    O_PART,         # (splits, B * Hq * Sq, Dv) float32: unnormalized sum of exp(s - m) v
    M_PART, L_PART,  # (splits, B * Hq * Sq) float32: row max m and sum of exp(s - m)
    MASK, smb, smh, smq, smk,
    Hq, Hkv, Sq, Sk, D, Dv,
    scale, softcap, window, SEED, threshold, keep_scale, BANDS,  # as _attn_fwd_kernel
    keys_per_split, rows_total,  # rows_total = B * Hq * Sq
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr, HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # Tile rows r = (head within the group) * Sq + query index: all G * Sq <= BLOCK_M query rows
    # reading kv head (b, hk), against keys [split * keys_per_split, +keys_per_split).
    split = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)  # b * Hkv + hk
    G = Hq // Hkv
    b = bk // Hkv
    r = tl.arange(0, BLOCK_M)
    h = (bk % Hkv) * G + r // Sq        # query head of each row
    i = r % Sq                          # query index of each row
    row_ok = r < G * Sq
    qrow = (b * Hq + h) * Sq + i        # row over (B, Hq, Sq)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims[None, :] < D
    vdims = tl.arange(0, BLOCK_DV)
    vdim_ok = vdims[None, :] < Dv
    q = tl.load(Q + qrow[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok, other=0.0)
    K += bk * Sk * D
    V += bk * Sk * Dv
    # Per-row mask base: row i of head h. _masked_scores adds i * smq, so give it h only.
    MASK_ROWS = MASK + b * smb + h[:, None] * smh
    # rows >= G * Sq get i >= Sq so that _masked_scores drops them
    i = tl.where(row_ok, i, Sq)

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, hi = _key_range(0, Sq, Sq, Sk, window, BANDS, BLOCK_N, CAUSAL, WINDOW, DOCS)
    lo = tl.maximum(lo, split * keys_per_split)
    hi = tl.minimum(hi, (split + 1) * keys_per_split)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kept = True
        if HAS_MASK and BOOL_MASK:  # (keys past the split's end read as its last one)
            kept = _tile_kept(i, tl.minimum(cols, hi - 1), MASK_ROWS, smq, smk, Sq, Sk, window, BANDS, CAUSAL, WINDOW,
                               DOCS)
        if kept:  # (a tile the mask drops whole changes nothing: skipped)
            in_split = cols < hi
            kT = tl.load(K + cols[None, :] * D + dims[:, None], mask=in_split[None, :] & (dims[:, None] < D), other=0.0)
            s = _scores(q, kT, scale, softcap, SOFTCAP, UPCAST, PRECISION)
            s = _masked_scores(s, i, cols, MASK_ROWS, smq, smk, Sq, Sk, window, BANDS, CAUSAL, WINDOW, DOCS,
                               HAS_MASK, BOOL_MASK)
            s = tl.where(in_split[None, :], s, NEG_INF)
            m_new = _maximum_nan(m_i, _max_nan(s, 1, INTERPRETED))
            m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
            p = tl.exp(s - m_ref[:, None])
            alpha = tl.exp(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:
                p = tl.where(_dropout_keep(SEED, qrow, cols, threshold), p * keep_scale, 0.0)
            v = tl.load(V + cols[:, None] * Dv + vdims[None, :], mask=in_split[:, None] & vdim_ok, other=0.0)
            acc = acc * alpha[:, None] + _dot(round_to(p, v.dtype, INTERPRETED), v, UPCAST, PRECISION)
            m_i = m_new

    part = split * rows_total + qrow
    tl.store(O_PART + part[:, None] * Dv + vdims[None, :], acc, mask=row_ok[:, None] & vdim_ok)
    tl.store(M_PART + part, m_i, mask=row_ok)
    tl.store(L_PART + part, l_i, mask=row_ok)


@triton.jit
def _attn_combine_kernel(
    O_PART, M_PART, L_PART,  # from _attn_fwd_split_kernel
    O, LSE,                  # (B, Hq, Sq, Dv) in (B, Sq, Hq, Dv) memory order, (B * Hq * Sq) outputs
    ROW_MAX, ROW_INV_SUM,    # (B * Hq * Sq) outputs, as _attn_fwd_kernel's
    rows_total, splits, Hq, Sq, Dv,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_DV)
    sp_ok = sp < splits
    m = tl.load(M_PART + sp * rows_total + row, mask=sp_ok, other=NEG_INF)
    l = tl.load(L_PART + sp * rows_total + row, mask=sp_ok, other=0.0)
    m_max = _max_nan(m, 0, INTERPRETED)
    m_ref = tl.where(m_max == NEG_INF, 0.0, m_max)
    w = tl.exp(m - m_ref)  # 0 for splits that saw nothing
    total = tl.sum(l * w, axis=0)
    parts = tl.load(O_PART + (sp[:, None] * rows_total + row) * Dv + dims[None, :],
                    mask=sp_ok[:, None] & (dims[None, :] < Dv), other=0.0)
    o = tl.sum(parts * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    b, h, i = row // (Hq * Sq), (row // Sq) % Hq, row % Sq  # row = (b * Hq + h) * Sq + i
    tl.store(O + ((b * Sq + i) * Hq + h) * Dv + dims, round_to(o, O.dtype.element_ty, INTERPRETED), mask=dims < Dv)
    lse = tl.where(total == 0.0, NEG_INF, m_ref + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(LSE + row, tl.where(m_max == float("inf"), m_max, lse))  # (a +inf score: +inf)
    _store_row_stats(ROW_MAX + row, ROW_INV_SUM + row, m_max, total, True)


# ---- backward --------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_delta_kernel(
    DO, O,          # (rows, D), D here v's head dim
    DELTA,          # (rows,) float32 output: rowsum(do * o)
    rows, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    ok = (r[:, None] < rows) & (dims[None, :] < D)
    do = tl.load(DO + r[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    o = tl.load(O + r[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(do * o, axis=1), mask=r < rows)


@triton.jit
def _probs_and_ds(q, kT, vT, do, m, inv_l, delta, dlse, rows, cols, start_n,
                  MASK, smq, smk, Sq, Sk, window, BANDS, scale, softcap, SEED, threshold, keep_scale, row0,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr, HAS_MASK: tl.constexpr,
                  BOOL_MASK: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """p = exp(s - m) / l and ds = p ((dp - delta) + dlse) of one (query block, key block) tile
    (m, inv_l: the rows' max and 1 / l, _store_row_stats).
    Returns (p as dv's product takes it: dropped and scaled under DROPOUT, ds, ds_raw): ds the
    gradient of the scores as the mask sees them (the mask's gradient), ds_raw that of the scaled
    q k^T (dq's and dk's): ds through the cap under SOFTCAP, else ds. row0: the global row of
    query 0 of the tile's head, (b * Hq + h) * Sq."""
    s = _scores(q, kT, scale, softcap, SOFTCAP, UPCAST, PRECISION)
    if SOFTCAP:
        t = s / softcap  # tanh(scale q k^T / c)
        cap_grad = (1.0 - t) * (1.0 + t)
    s = _masked_scores(s, rows, cols, MASK, smq, smk, Sq, Sk, window, BANDS, CAUSAL, WINDOW, DOCS, HAS_MASK,
                               BOOL_MASK)
    # m is 0 on fully masked rows, whose s are all -inf. s - m <= 0 in exact arithmetic, but
    # this s is recomputed apart from the forward's: at |s| ~ 1e29 their roundings differ by
    # ~1e22 and exp(+1e22) = inf made the row's gradients NaN (csrc/cpu/attention.cpp: exp_row)
    d = s - m[:, None]
    p = tl.exp(tl.where(d > 0.0, 0.0, d)) * inv_l[:, None]  # (a NaN d stays NaN)
    dp = _dot(do, vT, UPCAST, PRECISION)
    if DROPOUT:  # dp of the dropped p
        keep = _dropout_keep(SEED, row0 + rows, cols, threshold)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    single = _single_block_rows(rows, start_n, Sq, Sk, window, BANDS, BLOCK_N, CAUSAL, WINDOW, DOCS)
    if tl.max(single.to(tl.int32), axis=0) > 0:
        # p of such a row is renormalized to sum to 1, as an unfused softmax's is: s recomputed
        # here may differ from the forward's by an ulp (another product shape, another
        # summation order), and exp(s - m) / l is then 1 +- 1e-7 where one key takes all the weight.
        # Such rows take p from their own recomputed max, not the forward's: at |s| ~ 1e29 the
        # recomputed s differ from the forward's by ~1e22 (exp(s - m): 0 or inf).
        m_row = tl.max(s, axis=1)
        m_row = tl.where(m_row == NEG_INF, 0.0, m_row)
        p_own = tl.exp(s - m_row[:, None])
        p = tl.where(single[:, None], p_own, p)
        psum = tl.sum(p, axis=1)
        p = tl.where(single[:, None] & (psum[:, None] > 0), p / psum[:, None], p)
        delta = tl.where(single, tl.sum(p * dp, axis=1), delta)
    ds = p * ((dp - delta[:, None]) + dlse[:, None])
    ds_raw = ds
    if SOFTCAP:
        ds_raw = ds * cap_grad
    if DROPOUT:
        p = tl.where(keep, p * keep_scale, 0.0)
    return p, ds, ds_raw


@triton.jit
def _load_row_stats(ROW_MAX, ROW_INV_SUM, DELTA, DLSE, rows, Sq, HAS_DLSE: tl.constexpr):
    row_ok = rows < Sq
    m = tl.load(ROW_MAX + rows, mask=row_ok, other=0.0)
    inv_l = tl.load(ROW_INV_SUM + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    if HAS_DLSE:
        dlse = tl.load(DLSE + rows, mask=row_ok, other=0.0)
    else:
        dlse = tl.zeros_like(delta)
    return m, inv_l, delta, dlse


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,    # (B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv), (B, Hq, Sq, Dv)
    ROW_MAX, ROW_INV_SUM, DELTA, DLSE,  # (B, Hq, Sq) float32 each (_store_row_stats); DLSE only if HAS_DLSE
    DQ,             # (B, Hq, Sq, D) output
    DMASK,          # (B, Hq, Sq, Sk) output, written where visible (zeros elsewhere) [MASK_GRAD]
    MASK, smb, smh, smq, smk,
    Hq, Hkv, Sq, Sk, D, Dv,
    scale, softcap, window, SEED, threshold, keep_scale, BANDS, n_docs,  # as _attn_fwd_kernel
    Q_BUCKET, K_BUCKET,  # autotuning keys only
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr, HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DLSE: tl.constexpr, MASK_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    if DOCS:  # rows [start_m, end_m) of one document (_document_run)
        start_m, end_m = _document_run(tl.program_id(0), BANDS + 2 * Sq + 2 * Sk, n_docs, BLOCK_M)
    else:
        start_m = tl.program_id(0) * BLOCK_M
        end_m = tl.minimum(start_m + BLOCK_M, Sq)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % Hq
    b = bh // Hq
    kv = b * Hkv + h // (Hq // Hkv)
    Q += bh * Sq * D
    DO += bh * Sq * Dv
    DQ += bh * Sq * D
    ROW_MAX += bh * Sq
    ROW_INV_SUM += bh * Sq
    DELTA += bh * Sq
    DLSE += bh * Sq
    DMASK += bh * Sq * Sk
    K += kv * Sk * D
    V += kv * Sk * Dv
    MASK += b * smb + h * smh

    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < end_m) & (dims[None, :] < D)  # (rows past end_m, another program's: dropped)
    q = tl.load(Q + rows[:, None] * D + dims[None, :], mask=ok, other=0.0)
    do = tl.load(DO + rows[:, None] * Dv + vdims[None, :], mask=(rows[:, None] < end_m) & (vdims[None, :] < Dv),
                 other=0.0)  # (M, Dv)
    m, inv_l, delta, dlse = _load_row_stats(ROW_MAX, ROW_INV_SUM, DELTA, DLSE, rows, Sq, HAS_DLSE)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, end_m, Sq, Sk, window, BANDS, BLOCK_N, CAUSAL, WINDOW, DOCS)
    hi = tl.where(end_m > start_m, hi, lo)  # (an empty run: no keys)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kept = True
        if HAS_MASK and BOOL_MASK:
            kept = _tile_kept(rows, cols, MASK, smq, smk, Sq, Sk, window, BANDS, CAUSAL, WINDOW, DOCS)
        if kept:  # (a tile the mask drops whole adds nothing: skipped; no mask gradient with a boolean mask)
            kT = tl.load(K + cols[None, :] * D + dims[:, None], mask=(cols[None, :] < Sk) & (dims[:, None] < D),
                         other=0.0)  # (D, N)
            vT = tl.load(V + cols[None, :] * Dv + vdims[:, None], mask=(cols[None, :] < Sk) & (vdims[:, None] < Dv),
                         other=0.0)  # (Dv, N)
            p, ds, ds_raw = _probs_and_ds(q, kT, vT, do, m, inv_l, delta, dlse, rows, cols, start_n, MASK, smq, smk,
                                          Sq, Sk, window, BANDS, scale, softcap, SEED, threshold, keep_scale,
                                          bh * Sq, CAUSAL, WINDOW, DOCS, HAS_MASK, BOOL_MASK, DROPOUT, SOFTCAP,
                                          BLOCK_N, UPCAST, PRECISION)
            if MASK_GRAD:  # d loss / d (additive mask) = ds
                tl.store(DMASK + rows[:, None].to(tl.int64) * Sk + cols[None, :],
                         round_to(ds, DMASK.dtype.element_ty, INTERPRETED),
                         mask=(rows[:, None] < end_m) & (cols[None, :] < Sk))
            dq += _dot(round_to(ds_raw, kT.dtype, INTERPRETED), tl.trans(kT), UPCAST, PRECISION)
    tl.store(DQ + rows[:, None] * D + dims[None, :], round_to(dq * scale, DQ.dtype.element_ty, INTERPRETED), mask=ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, ROW_MAX, ROW_INV_SUM, DELTA, DLSE,  # as _attn_bwd_dq_kernel
    DK, DV,         # (B, Hkv, Sk, D), (B, Hkv, Sk, Dv) outputs
    MASK, smb, smh, smq, smk,
    Hq, Hkv, Sq, Sk, D, Dv,
    scale, softcap, window, SEED, threshold, keep_scale, BANDS, n_docs,  # as _attn_fwd_kernel
    Q_BUCKET, K_BUCKET,  # autotuning keys only
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr, HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    if DOCS:  # keys [start_n, end_n) of one document (_document_run, over the keys' boundaries)
        start_n, end_n = _document_run(tl.program_id(0), BANDS + 2 * Sq + 2 * Sk + n_docs + 1, n_docs, BLOCK_N)
    else:
        start_n = tl.program_id(0) * BLOCK_N
        end_n = tl.minimum(start_n + BLOCK_N, Sk)
    bk = tl.program_id(1).to(tl.int64)  # b * Hkv + hk
    G = Hq // Hkv
    b = bk // Hkv
    K += bk * Sk * D
    V += bk * Sk * Dv
    DK += bk * Sk * D
    DV += bk * Sk * Dv

    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    k_ok = (cols[:, None] < end_n) & (dims[None, :] < D)  # (keys past end_n, another program's: dropped)
    v_ok = (cols[:, None] < end_n) & (vdims[None, :] < Dv)
    k = tl.load(K + cols[:, None] * D + dims[None, :], mask=k_ok, other=0.0)  # (N, D)
    v = tl.load(V + cols[:, None] * Dv + vdims[None, :], mask=v_ok, other=0.0)  # (N, Dv)
    kT = tl.trans(k)
    vT = tl.trans(v)

    # Under DOCS, the keys past end_n may be the same document's (the run ends at a block
    # boundary): the tiles take end_n for Sk, so that they are out of range (Sk enters the
    # documents' masking only as that bound).
    key_end = end_n if DOCS else Sk
    # Queries that may see keys [start_n, start_n + BLOCK_N): causal needs i + Sk - Sq >= j,
    # a window needs i + Sk - Sq < j + w; under DOCS, the key bands say (both ends grow with j).
    q_lo = 0
    q_hi = Sq
    if DOCS:
        q_lo = tl.load(BANDS + 2 * Sq + start_n)
        q_lo = (q_lo // BLOCK_M) * BLOCK_M
        q_hi = tl.load(BANDS + 2 * Sq + Sk + end_n - 1)
        q_hi = tl.where(end_n > start_n, q_hi, q_lo)  # (an empty run: no queries)
    else:
        if CAUSAL:
            q_lo = tl.maximum(0, start_n - (Sk - Sq))
            q_lo = (q_lo // BLOCK_M) * BLOCK_M
        if WINDOW:
            q_hi = tl.minimum(Sq, start_n + BLOCK_N - 1 - (Sk - Sq) + window)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, G):
        bh = b * Hq + (bk % Hkv) * G + g
        h = bh % Hq
        MASK_H = MASK + b * smb + h * smh
        for start_m in range(q_lo, q_hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            kept = True
            if HAS_MASK and BOOL_MASK:
                kept = _tile_kept(rows, cols, MASK_H, smq, smk, Sq, key_end, window, BANDS, CAUSAL, WINDOW, DOCS)
            if kept:  # (a tile the mask drops whole adds nothing: skipped)
                q = tl.load(Q + (bh * Sq + rows[:, None]) * D + dims[None, :],
                            mask=(rows[:, None] < Sq) & (dims[None, :] < D), other=0.0)
                do = tl.load(DO + (bh * Sq + rows[:, None]) * Dv + vdims[None, :],
                             mask=(rows[:, None] < Sq) & (vdims[None, :] < Dv), other=0.0)
                m, inv_l, delta, dlse = _load_row_stats(ROW_MAX + bh * Sq, ROW_INV_SUM + bh * Sq, DELTA + bh * Sq,
                                                        DLSE + bh * Sq, rows, Sq, HAS_DLSE)
                p, ds, ds_raw = _probs_and_ds(q, kT, vT, do, m, inv_l, delta, dlse, rows, cols, start_n, MASK_H,
                                              smq, smk,
                                              Sq, key_end, window, BANDS, scale, softcap, SEED, threshold,
                                              keep_scale, bh * Sq, CAUSAL, WINDOW, DOCS, HAS_MASK, BOOL_MASK,
                                              DROPOUT, SOFTCAP, BLOCK_N, UPCAST, PRECISION)
                dv += _dot(tl.trans(round_to(p, do.dtype, INTERPRETED)), do, UPCAST, PRECISION)
                dk += _dot(tl.trans(round_to(ds_raw, q.dtype, INTERPRETED)), q, UPCAST, PRECISION)
    tl.store(DK + cols[:, None] * D + dims[None, :], round_to(dk * scale, DK.dtype.element_ty, INTERPRETED), mask=k_ok)
    tl.store(DV + cols[:, None] * Dv + vdims[None, :], round_to(dv, DV.dtype.element_ty, INTERPRETED), mask=v_ok)


# ---- launch configuration --------------------------------------------------------------------

def _config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Candidate tiles per kernel and head-dim bucket (that of the larger of BLOCK_D and BLOCK_DV:
# _tile_bucket), meant to fit the shared memory of sm_80 and sm_90 in 16-bit dtypes;
# autotuning picks among the 2-4 of a bucket, per shape bucket, and skips any that runs out
# of resources (float32 doubles the shared memory).
# tests/test_triton_compile.py compiles the first of each bucket (the one used when
# LMFAST_AUTOTUNE=0) and checks its shared memory.
FWD_CONFIGS = {
    64: [_config(128, 64, 4, 3), _config(128, 128, 8, 3), _config(64, 64, 4, 3), _config(128, 32, 4, 4)],
    128: [_config(128, 64, 8, 3), _config(128, 32, 4, 3), _config(64, 64, 4, 3), _config(128, 128, 8, 2)],
    256: [_config(64, 32, 4, 2), _config(128, 32, 8, 2), _config(64, 64, 8, 2)],
}
BWD_DQ_CONFIGS = {
    64: [_config(64, 64, 4, 2), _config(128, 64, 8, 2), _config(64, 128, 8, 2)],
    128: [_config(64, 64, 4, 2), _config(128, 32, 8, 2), _config(64, 32, 4, 2)],
    256: [_config(32, 32, 4, 1), _config(64, 32, 8, 1)],
}
BWD_DKDV_CONFIGS = {
    64: [_config(64, 64, 4, 2), _config(64, 128, 8, 2), _config(32, 128, 4, 2)],
    128: [_config(64, 64, 8, 2), _config(32, 64, 4, 2), _config(64, 32, 4, 2)],
    256: [_config(32, 32, 4, 1), _config(32, 64, 8, 1)],
}


def interpreted_blocks(q_len: int, k_len: int) -> dict:
    """Tiles in the interpreter (tests on CPU): 16 so that small test shapes span several
    blocks with a partial last one (32 from 65 rows on: still 3-4 blocks, and half the
    interpreted steps of 16's 5-8); larger for long sequences, whose loops would take minutes
    (1000 keys still span 8 blocks of 128)."""
    def block(n):
        return 16 if n <= 64 else 32 if n <= 128 else 64 if n <= 512 else 128
    return {"BLOCK_M": block(q_len), "BLOCK_N": block(k_len)}


def _bucket(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


def head_dim_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _tile_bucket(args: dict) -> int:
    """The config tables' bucket of a launch: that of its wider head-dim block (q's or v's)."""
    return _bucket(max(args["BLOCK_D"], args["BLOCK_DV"]))


def _tuned(kernel, table):
    """kernel autotuned over table[_tile_bucket(its head-dim blocks)], keyed on the shape buckets
    it is launched with (Q_BUCKET, K_BUCKET: powers of two of the lengths), the flags and dtypes."""
    configs = [c for cs in table.values() for c in cs]

    def prune(configs, named_args, **kwargs):
        wanted = table[_tile_bucket({**kwargs, **named_args})]
        return [c for c in configs if any(c is w for w in wanted)]

    return triton.autotune(configs, key=["Q_BUCKET", "K_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL", "WINDOW", "DOCS",
                                         "HAS_MASK", "DROPOUT"],
                           prune_configs_by={"early_config_prune": prune})(kernel)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not _common.interpreted() and torch.get_float32_matmul_precision() != "highest":
        return "tf32"  # torch allows TF32 for float32 matmuls, so eager attention uses it too
    return "ieee"


def _common_flags(q: torch.Tensor, v: torch.Tensor, mask, causal: bool, window, dropout_p: float, softcap: float,
                  docs: bool = False):
    return dict(CAUSAL=causal, WINDOW=window is not None, DOCS=docs, HAS_MASK=mask is not None,
                BOOL_MASK=mask is not None and mask.dtype == torch.bool, DROPOUT=dropout_p > 0, SOFTCAP=softcap > 0,
                BLOCK_D=head_dim_block(q.shape[-1]), BLOCK_DV=head_dim_block(v.shape[-1]),
                UPCAST=_common.interpreted() and q.dtype == torch.bfloat16, PRECISION=_precision(q.dtype))


def _dropout_args(dropout_p: float, seed, like):
    """(SEED pointer, threshold, keep_scale) of the kernels (like: a stand-in pointer without dropout)."""
    if dropout_p == 0:
        return like, 0, 1.0
    return seed, reference.dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


@triton.jit
def _boundary(CU, stride, d, n_docs):
    """Boundary d of a cu_seqlens (int64; 0 outside [0, n_docs], which valid values never ask for)."""
    return tl.load(CU + d * stride, mask=(d >= 0) & (d <= n_docs), other=0).to(tl.int64)


@triton.jit
def _document_of(CU, stride, x, n_docs, steps):
    """The document holding each index x: how many of the boundaries CU[1 : n_docs + 1] are <= x
    (torch.searchsorted(cu[1:], x, right=True)), kept in [0, n_docs - 1]. A binary search of
    `steps` halvings (the bit length of n_docs)."""
    a = tl.zeros_like(x)
    b = a + n_docs
    for _ in range(steps):
        active = a < b
        mid = (a + b) // 2
        right = active & (_boundary(CU, stride, mid + 1, n_docs) <= x)
        a = tl.where(right, mid + 1, a)
        b = tl.where(active & ~right, mid, b)
    return tl.maximum(tl.minimum(a, n_docs - 1), 0)


@triton.jit
def _document_bands_kernel(
    CU_Q, CU_K,     # (n_docs + 1,) int32 or int64: the documents' query rows and keys (cu_seqlens)
    BANDS,          # (2 Sq + 2 Sk + 2 n_docs + 3,) int32 output: lo, hi of each row; first, end of each key;
                    # the boundaries (cu_seqlens_q's, cu_seqlens_k's); the check
    stride_q, stride_k, n_docs, steps, Sq, Sk, window,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHECK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program t: rows, keys and boundaries [t BLOCK, (t + 1) BLOCK) of _document_bands' table;
    with CHECK, program 0 also writes whether the boundaries are valid (1) or not (0) to its last
    entry."""
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # query row i of document d sees keys [lo, hi) (csrc/documents.h: row_band)
    d = _document_of(CU_Q, stride_q, t, n_docs, steps)
    key_end = _boundary(CU_K, stride_k, d + 1, n_docs)
    pos = t + key_end - _boundary(CU_Q, stride_q, d + 1, n_docs)  # its key position
    lo = _boundary(CU_K, stride_k, d, n_docs)
    hi = key_end
    if WINDOW:
        lo = tl.maximum(lo, pos - (window - 1))
    if CAUSAL:
        hi = tl.minimum(hi, pos + 1)
    lo = tl.minimum(tl.maximum(lo, 0), Sk)  # (on a GPU, values the check rejects are still read first)
    hi = tl.maximum(tl.minimum(tl.maximum(hi, 0), Sk), lo)
    tl.store(BANDS + t, lo.to(tl.int32), mask=t < Sq)
    tl.store(BANDS + Sq + t, hi.to(tl.int32), mask=t < Sq)
    # key j of document d is seen by its rows [first, end): those at key positions j .. j + window - 1
    d = _document_of(CU_K, stride_k, t, n_docs, steps)
    row_start = _boundary(CU_Q, stride_q, d, n_docs)
    row_end = _boundary(CU_Q, stride_q, d + 1, n_docs)
    shift = row_end - _boundary(CU_K, stride_k, d + 1, n_docs)  # row = key position + shift
    first = row_start
    end = row_end
    if CAUSAL:
        first = tl.minimum(tl.maximum(first, t + shift), row_end)
    if WINDOW:
        end = tl.maximum(tl.minimum(end, t + window + shift), first)
    first = tl.minimum(tl.maximum(first, 0), Sq)
    end = tl.maximum(tl.minimum(tl.maximum(end, 0), Sq), first)
    tl.store(BANDS + 2 * Sq + t, first.to(tl.int32), mask=t < Sk)
    tl.store(BANDS + 2 * Sq + Sk + t, end.to(tl.int32), mask=t < Sk)
    # the boundaries, int32 and clamped to [0, Sq] / [0, Sk]: the kernels' runs of one document (_document_run)
    CU_TABLE = BANDS + 2 * Sq + 2 * Sk
    cq = tl.minimum(tl.maximum(_boundary(CU_Q, stride_q, t, n_docs), 0), Sq)
    ck = tl.minimum(tl.maximum(_boundary(CU_K, stride_k, t, n_docs), 0), Sk)
    tl.store(CU_TABLE + t, cq.to(tl.int32), mask=t <= n_docs)
    tl.store(CU_TABLE + n_docs + 1 + t, ck.to(tl.int32), mask=t <= n_docs)
    if CHECK:
        if tl.program_id(0) == 0:  # start at 0, end at Sq and Sk, never decrease
            ok = (_boundary(CU_Q, stride_q, 0, n_docs) == 0) & (_boundary(CU_Q, stride_q, n_docs, n_docs) == Sq)
            ok = ok & (_boundary(CU_K, stride_k, 0, n_docs) == 0) & (_boundary(CU_K, stride_k, n_docs, n_docs) == Sk)
            falls = 0
            for start in range(0, n_docs, BLOCK):
                b = start + 1 + tl.arange(0, BLOCK)  # boundaries b, each against b - 1
                q_falls = _boundary(CU_Q, stride_q, b, n_docs) < _boundary(CU_Q, stride_q, b - 1, n_docs)
                k_falls = _boundary(CU_K, stride_k, b, n_docs) < _boundary(CU_K, stride_k, b - 1, n_docs)
                falls += tl.sum(((q_falls | k_falls) & (b <= n_docs)).to(tl.int32), axis=0)
            tl.store(CU_TABLE + 2 * n_docs + 2, (ok & (falls == 0)).to(tl.int32))


def _document_bands(cu_q, cu_k, Sq: int, Sk: int, causal: bool, window, check: bool) -> torch.Tensor:
    """Packed documents as the kernels read them (DOCS): int32 (2 Sq + 2 Sk + 2 n_docs + 3,) on
    cu_q's device, [0, Sq) and [Sq, 2 Sq) each query row's visible keys [lo, hi), exactly as
    csrc/documents.h's row_band (the CPU and CUDA C++ kernels' table), then per key the queries
    that see it, [first, end) (both ends of the row bands grow with the row: the rows of the key's
    document from the one at its key position (causal) up to the last that has it in its window),
    then cu_seqlens_q and cu_seqlens_k as int32 (the kernels' runs of one document: _document_run).

    One launch, whatever the number of documents: a decode step of many sequences pays its host
    time once, not per tensor op (the tensor-op form of this table took 23 ops, and the values'
    check 22 more). With `check` (the forward), the kernel also checks the values (start at 0,
    never decrease, end at Sq and Sk) into the last entry (1: valid), which attention_fwd asserts
    without waiting on the device: a GPU reports bad values as a device-side assert; the op layer
    checks CPU tensors on the host first, with a ValueError naming the argument
    (lmfast.ops._checks.document_values)."""
    n_docs = cu_q.numel() - 1  # (a window past Sk + 1 limits no row; clamped, its arithmetic stays in int64)
    bands = torch.empty(2 * Sq + 2 * Sk + 2 * n_docs + 3, dtype=torch.int32, device=cu_q.device)
    block = 1024 if not _common.interpreted() else 256
    _document_bands_kernel[(triton.cdiv(max(Sq, Sk, n_docs + 1), block),)](
        cu_q, cu_k, bands, cu_q.stride(0), cu_k.stride(0), n_docs, max(n_docs, 1).bit_length(), Sq, Sk,
        0 if window is None else min(window, Sk + 1), CAUSAL=causal, WINDOW=window is not None, CHECK=check, BLOCK=block)
    return bands


def _blocks_along(length: int, block: int, n_docs: int, docs: bool) -> int:
    """Programs along the rows (or keys) of a launch: length / block; under DOCS, runs of one
    document each, one more per document at most (_document_run)."""
    return length // block + n_docs if docs else triton.cdiv(length, block)


def _mask_args(mask, like):
    """(mask pointer, its 4 strides): a uint8 view for bool masks, 0 strides on broadcast dims."""
    if mask is None:
        return like, (0, 0, 0, 0)
    arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return arg, tuple(0 if mask.shape[d] == 1 else mask.stride(d) for d in range(4))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Decoding path: used when all query rows of a kv-head group fit one tile and the cache is long.
SPLIT_MAX_ROWS = 64
SPLIT_MIN_KEYS = 512
SPLIT_KEYS_MIN_PER_SPLIT = 256


def _split_plan(B, Hq, Hkv, Sq, Sk, device) -> int:
    """Number of key splits for the decoding path (0: use the regular forward)."""
    rows = (Hq // Hkv) * Sq
    if rows > SPLIT_MAX_ROWS or Sk < SPLIT_MIN_KEYS:
        return 0
    sms = 4 if device.type != "cuda" else _multiprocessors(device.index or 0)  # interpreter: 4, so tests split
    want = -(-2 * sms // (B * Hkv))  # ~2 programs per SM
    return max(1, min(want, Sk // SPLIT_KEYS_MIN_PER_SPLIT, 128))


# Kernels as launched on a GPU: autotuned, or with the first config of the head-dim bucket
# when LMFAST_AUTOTUNE=0 (the test suite does that: autotuning every flag combination it
# runs would compile each kernel several times over) or torch.use_deterministic_algorithms(True)
# is on: autotuning picks tiles by timing, so two processes may pick different tiles and round
# differently; the fixed tiles give the same bits in every process on one GPU model.
_TUNED = {
    _attn_fwd_kernel: (_tuned(_attn_fwd_kernel, FWD_CONFIGS), FWD_CONFIGS),
    _attn_bwd_dq_kernel: (_tuned(_attn_bwd_dq_kernel, BWD_DQ_CONFIGS), BWD_DQ_CONFIGS),
    _attn_bwd_dkdv_kernel: (_tuned(_attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS), BWD_DKDV_CONFIGS),
}


def autotuning() -> bool:
    """Whether GPU launches autotune their tiles (see above)."""
    return os.environ.get("LMFAST_AUTOTUNE", "1") != "0" and not torch.are_deterministic_algorithms_enabled()


def _launch(kernel, grid_of, args, flags, q_len, k_len):
    """Launches kernel; grid_of(meta) -> grid. The length buckets are appended to args (the
    kernels' Q_BUCKET, K_BUCKET)."""
    args = (*args, triton.next_power_of_2(max(q_len, 1)), triton.next_power_of_2(max(k_len, 1)))
    tuned, table = _TUNED[kernel]
    if _common.interpreted():
        meta = {**flags, **interpreted_blocks(q_len, k_len)}
        kernel[grid_of(meta)](*args, **meta, INTERPRETED=True)
    elif not autotuning():
        cfg = table[_tile_bucket(flags)][0]
        meta = {**flags, **cfg.kwargs}
        kernel[grid_of(meta)](*args, **meta, INTERPRETED=False, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        tuned[grid_of](*args, **flags, INTERPRETED=False)


# ---- entry points (contracts as in csrc/ops.h) -------------------------------------------------

def attention_fwd(q, k, v, mask, scale: float, causal: bool, window, dropout_p: float = 0.0, dropout_seed=None,
                  softcap: float = 0.0, cu_seqlens_q=None, cu_seqlens_k=None):
    """(o, lse, row_stats) as csrc/ops.h's attention_fwd: row_stats (2, B, Hq, Sq) float32, each
    row's softmax max m and 1 / l, which attention_bwd takes (_store_row_stats)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # (the kernels index them contiguously)
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    o = torch.empty((B, Sq, Hq, Dv), device=q.device, dtype=q.dtype).transpose(1, 2)  # as csrc/ops.h
    lse = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    stats = torch.empty((2, B, Hq, Sq), device=q.device, dtype=torch.float32)  # (row max, 1 / row sum)
    docs = cu_seqlens_q is not None
    bands = q
    if docs:  # (the table, and the values' check, even when no row is asked for)
        bands = _document_bands(cu_seqlens_q, cu_seqlens_k, Sq, Sk, causal, window, check=True)
        torch._assert_async(bands[-1], "cu_seqlens_q and cu_seqlens_k must start at 0, not decrease, and end at "
                                       "the query and key counts")
    if lse.numel() == 0:
        return o, lse, stats
    # Sk = 0 (every row empty: o = 0, lse = -inf) and D = 0 need no special case: the loops
    # run zero times / all head-dim lanes are masked.
    mask_arg, ms = _mask_args(mask, q)
    flags = _common_flags(q, v, mask, causal, window, dropout_p, softcap, docs)
    w = 0 if window is None else window
    drop = _dropout_args(dropout_p, dropout_seed, q)
    splits = _split_plan(B, Hq, Hkv, Sq, Sk, q.device)
    if splits:
        return _attention_fwd_split(q, k, v, mask_arg, ms, flags, scale, softcap, w, drop, bands, splits, o, lse,
                                    stats)
    n_docs = cu_seqlens_q.numel() - 1 if docs else 0
    args = (q, k, v, o, lse, stats[0], stats[1], mask_arg, *ms, Hq, Hkv, Sq, Sk, D, Dv, scale, softcap, w, *drop,
            bands, n_docs)
    _launch(_attn_fwd_kernel, lambda m: (_blocks_along(Sq, m["BLOCK_M"], n_docs, docs), B * Hq), args, flags, Sq, Sk)
    return o, lse, stats


def _attention_fwd_split(q, k, v, mask_arg, ms, flags, scale, softcap, w, drop, bands, splits, o, lse, stats):
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    block_n = interpreted_blocks(Sq, Sk)["BLOCK_N"] if _common.interpreted() else 64
    keys_per_split = triton.cdiv(triton.cdiv(Sk, splits), block_n) * block_n
    splits = triton.cdiv(Sk, keys_per_split)
    rows = B * Hq * Sq
    o_part = torch.empty((splits, rows, Dv), device=q.device, dtype=torch.float32)
    m_part = torch.empty((splits, rows), device=q.device, dtype=torch.float32)
    l_part = torch.empty((splits, rows), device=q.device, dtype=torch.float32)
    block_m = max(16, triton.next_power_of_2((Hq // Hkv) * Sq))
    interp = _common.interpreted()
    _attn_fwd_split_kernel[(splits, B * Hkv)](
        q, k, v, o_part, m_part, l_part, mask_arg, *ms, Hq, Hkv, Sq, Sk, D, Dv, scale, softcap, w, *drop, bands,
        keys_per_split, rows, CAUSAL=flags["CAUSAL"], WINDOW=flags["WINDOW"], DOCS=flags["DOCS"],
        HAS_MASK=flags["HAS_MASK"],
        BOOL_MASK=flags["BOOL_MASK"], DROPOUT=flags["DROPOUT"], SOFTCAP=flags["SOFTCAP"],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=flags["BLOCK_D"], BLOCK_DV=flags["BLOCK_DV"], UPCAST=flags["UPCAST"],
        PRECISION=flags["PRECISION"], INTERPRETED=interp, **({} if interp else {"num_warps": 4, "num_stages": 2}))
    _attn_combine_kernel[(rows,)](
        o_part, m_part, l_part, o, lse, stats[0], stats[1], rows, splits, Hq, Sq, Dv,
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=flags["BLOCK_DV"], INTERPRETED=interp,
        **({} if interp else {"num_warps": 4}))
    return o, lse, stats


def attention_bwd(dout, q, k, v, o, row_stats, dlse, mask, scale: float, causal: bool, window, mask_grad: bool,
                  dropout_p: float = 0.0, dropout_seed=None, softcap: float = 0.0, cu_seqlens_q=None,
                  cu_seqlens_k=None):
    """(dq, dk, dv, dmask) as csrc/ops.h's attention_bwd, from the row_stats (2, B, Hq, Sq) of
    attention_fwd (this module's or the CUDA C++ kernels')."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    acc = reference.acc_dtype(q.dtype)  # dmask unrounded (csrc/ops.h)
    dmask = q.new_zeros((B, Hq, Sq, Sk), dtype=acc) if mask_grad else q.new_empty(0, dtype=acc)
    if Sq == 0 or B * Hq == 0:  # no query: k and v get zero gradients
        return dq, dk.zero_(), dv.zero_(), dmask
    rows = B * Hq * Sq
    delta = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    block_dv = head_dim_block(Dv)  # (delta = rowsum(do o), over v's head dim)
    block_r = 16 if _common.interpreted() else max(1, 8192 // block_dv)
    _attn_bwd_delta_kernel[(triton.cdiv(rows, block_r),)](dout, o, delta, rows, Dv, BLOCK_R=block_r, BLOCK_D=block_dv)
    mask_arg, ms = _mask_args(mask, q)
    docs = cu_seqlens_q is not None
    bands = _document_bands(cu_seqlens_q, cu_seqlens_k, Sq, Sk, causal, window, check=False) if docs else q
    flags = _common_flags(q, v, mask, causal, window, dropout_p, softcap, docs)
    w = 0 if window is None else window
    drop = _dropout_args(dropout_p, dropout_seed, q)
    dlse_arg = delta if dlse is None else dlse
    row_max, row_inv_sum = row_stats[0], row_stats[1]
    n_docs = cu_seqlens_q.numel() - 1 if docs else 0
    dq_args = (q, k, v, dout, row_max, row_inv_sum, delta, dlse_arg, dq, dmask if mask_grad else q, mask_arg, *ms,
               Hq, Hkv, Sq, Sk, D, Dv, scale, softcap, w, *drop, bands, n_docs)
    _launch(_attn_bwd_dq_kernel, lambda m: (_blocks_along(Sq, m["BLOCK_M"], n_docs, docs), B * Hq), dq_args,
            {**flags, "HAS_DLSE": dlse is not None, "MASK_GRAD": mask_grad}, Sq, Sk)
    dkdv_args = (q, k, v, dout, row_max, row_inv_sum, delta, dlse_arg, dk, dv, mask_arg, *ms, Hq, Hkv, Sq, Sk, D, Dv,
                 scale, softcap, w, *drop, bands, n_docs)
    _launch(_attn_bwd_dkdv_kernel, lambda m: (_blocks_along(Sk, m["BLOCK_N"], n_docs, docs), B * Hkv), dkdv_args,
            {**flags, "HAS_DLSE": dlse is not None}, Sq, Sk)
    return dq, dk, dv, dmask
