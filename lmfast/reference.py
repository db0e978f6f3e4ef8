"""Plain-PyTorch reference of every lmfast op: the specification the tests trust.

Written for clarity, not speed. Each function computes in float32 (float64 for float64
inputs) and returns outputs in the input dtype, which is what PyTorch eager does for these ops
(its norms and softmax accumulate 16-bit inputs in float32). Evaluated on float64 copies of
the inputs it is the oracle; evaluated on the inputs themselves it is the "eager" baseline of
the error budget (see lmfast.testing). backend="torch" runs these functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, residual: Tensor | None = None):
    """LayerNorm over the last dim of s = x + residual:

        y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias      (biased variance)

    Returns y, or (y, s) when `residual` is given. s is rounded to x.dtype before it is
    normalized, exactly like eager `norm(x + residual)`.
    """
    s = x if residual is None else x + residual
    sf = s.to(acc_dtype(x.dtype))
    centered = sf - sf.mean(-1, keepdim=True)
    y = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(sf.dtype)
    if bias is not None:
        y = y + bias.to(sf.dtype)
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6,
             residual: Tensor | None = None, weight_offset: float = 0.0):
    """RMSNorm over the last dim of s = x + residual (as in Llama, T5, Qwen, Mistral):

        y = s / sqrt(mean(s^2) + eps) * (weight_offset + weight)

    weight_offset = 1 is the zero-centered weight of Gemma, Qwen3-Next and Qwen3.5, whose
    RMSNorm scales by 1 + weight (added in the accumulation dtype, as they add it in float32).
    Without a weight the scale is 1 and weight_offset must be 0.
    Returns y, or (y, s) when `residual` is given.
    """
    s = x if residual is None else x + residual
    sf = s.to(acc_dtype(x.dtype))
    y = sf * torch.rsqrt(sf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.to(sf.dtype) + weight_offset)
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


def causal_keep(q_len: int, k_len: int, device=None) -> Tensor:
    """(q_len, k_len) boolean mask, True = keep: query i sees keys j <= i + k_len - q_len.

    Bottom-right aligned: when q_len < k_len (decoding with a KV cache) the last query sees
    every key. This differs from SDPA's `is_causal`, which is top-left aligned.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def softmax(x: Tensor, dim: int = -1, scale: float = 1.0, mask: Tensor | None = None,
            causal: bool = False) -> Tensor:
    """softmax(scale * x + mask) along `dim`.

    `mask` is additive (float) or boolean (True = keep), broadcastable to x. `causal=True`
    (only with dim=-1) also masks keys j > i + N - M over the last two dims (M, N) of x.
    Rows with every entry masked give zeros, not NaN.
    """
    z = x.to(acc_dtype(x.dtype)) * scale
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(z.dtype)
    if causal:
        z = z.masked_fill(~causal_keep(x.shape[-2], x.shape[-1], x.device), float("-inf"))
    fully_masked = (z == float("-inf")).all(dim, keepdim=True)
    # A fully masked row is softmaxed as zeros (finite, so its gradient is 0, not NaN),
    # then its output is set to 0.
    y = torch.softmax(z.masked_fill(fully_masked, 0.0), dim).masked_fill(fully_masked, 0.0)
    return y.to(x.dtype)


def attention_keep(q_len: int, k_len: int, causal: bool, window: int | None, device=None) -> Tensor | None:
    """(q_len, k_len) boolean mask (True = keep) of the position-based masking, or None.

    Query i sits at key position p = i + k_len - q_len (bottom-right alignment). `causal` keeps
    keys j <= p; `window=w` keeps keys j > p - w, so with causal a query sees its w most recent
    keys, itself included (as Hugging Face's sliding-window attention).
    """
    if not causal and window is None:
        return None
    p = torch.arange(q_len, device=device).unsqueeze(1) + (k_len - q_len)  # (q_len, 1)
    j = torch.arange(k_len, device=device).unsqueeze(0)                    # (1, k_len)
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= p
    if window is not None:
        keep &= j > p - window
    return keep


def documents_keep(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, causal: bool, window: int | None,
                   device=None) -> Tensor:
    """(Sq, Sk) boolean mask (True = keep) of packed documents (variable-length attention):
    document d holds queries [cu_seqlens_q[d], cu_seqlens_q[d + 1]) and keys
    [cu_seqlens_k[d], cu_seqlens_k[d + 1]); a query sees its own document's keys only, masked
    inside the document as attention_keep masks a whole sequence (causal bottom-right aligned)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    keep = torch.zeros(cq[-1], ck[-1], dtype=torch.bool, device=device)
    for q0, q1, k0, k1 in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
        inside = attention_keep(q1 - q0, k1 - k0, causal, window, device)
        keep[q0:q1, k0:k1] = True if inside is None else inside
    return keep


_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a constant c < 2^32, with no int64
    overflow: c in two 16-bit halves."""
    low = (x * (c & 0xFFFF)) & _M32
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (C. Wellons' lowbias32) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """Entries whose hash is below this (floor(p * 2^32)) are dropped."""
    return min(math.floor(p * 4294967296.0), 4294967295)


def dropout_keep(seed: int, rows: Tensor, keys: Tensor, p: float) -> Tensor:
    """Attention dropout's mask, True = keep: the specification every kernel follows.

    Entry (row, key j) of p = softmax(s), row = (b * Hq + h) * Sq + i, is kept where
        mix32(row_key ^ (j * 0x9E3779B9 mod 2^32)) >= floor(p * 2^32),
        row_key = mix32(mix32(row_lo ^ seed_lo) ^ row_hi ^ seed_hi)
    (lo/hi: the low and high 32 bits of the 64-bit row index and seed). A hash, not a random
    stream, so the backward regenerates the forward's mask and no tiling or thread count
    changes it. rows and keys: int64 tensors that broadcast against each other.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    row_key = _mix32(_mix32((rows & _M32) ^ (seed & _M32)) ^ (rows >> 32) ^ (seed >> 32))
    bits = _mix32(row_key ^ _mul32(keys & _M32, 0x9E3779B9))
    return bits >= dropout_threshold(p)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
              causal: bool = False, scale: float | None = None, window: int | None = None,
              dropout_p: float = 0.0, dropout_seed: int | None = None, sinks: Tensor | None = None,
              softcap: float | None = None, cu_seqlens_q: Tensor | None = None, cu_seqlens_k: Tensor | None = None):
    """Scaled dot-product attention, materializing the (Sq, Sk) scores: the oracle.

        s = scale * q @ k^T + attn_mask          (boolean mask: s = -inf where False)
        with softcap c: s = c * tanh(scale * q @ k^T / c) + attn_mask   (Gemma 2's logit softcapping)
        o = softmax(s) @ v,   lse = logsumexp(s)  over keys

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq a multiple of Hkv: query head h reads kv
    head h // (Hq // Hkv) (grouped-query attention). scale defaults to D**-0.5. causal and
    window as in attention_keep. Rows with every key masked give o = 0 and lse = -inf.
    dropout_p > 0: p = softmax(s) is multiplied by dropout_keep(dropout_seed, ...) / (1 - dropout_p)
    before p @ v (lse is that of s, without dropout).
    sinks (Hq,): attention sinks (gpt-oss), one more score per row, sinks[h], with no value: it
    joins the softmax (and lse) and is dropped before p @ v.
    cu_seqlens_q, cu_seqlens_k: packed documents in a batch of one (documents_keep, which then
    applies causal and window inside each document).
    Returns (o in q's dtype, lse (B, Hq, Sq) in float32, or float64 for float64 inputs).
    """
    acc = acc_dtype(q.dtype)
    vf = v.to(acc).repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, Hq, Sk, D)
    s = _attention_scores(q, k, attn_mask, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k)
    if sinks is not None:  # (B, Hq, Sq, Sk + 1)
        s = torch.cat([s, sinks.to(acc).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
    fully_masked = (s == float("-inf")).all(-1, keepdim=True)  # (B, Hq, Sq, 1); also Sk = 0
    s = s.masked_fill(fully_masked, 0.0)  # finite, so gradients stay 0, not NaN
    lse = torch.logsumexp(s, -1, keepdim=True).masked_fill(fully_masked, float("-inf"))
    p = torch.softmax(s, -1).masked_fill(fully_masked, 0.0)
    if sinks is not None:
        p = p[..., :-1]
    if dropout_p > 0:
        B, Hq, Sq, Sk = p.shape
        rows = torch.arange(B * Hq * Sq, device=q.device).view(B, Hq, Sq, 1)
        keep = dropout_keep(dropout_seed, rows, torch.arange(Sk, device=q.device), dropout_p)
        p = p * keep / (1 - dropout_p)
    return (p @ vf).to(q.dtype), lse.squeeze(-1)


def _attention_scores(q, k, attn_mask, causal, scale, window, softcap, cu_seqlens_q=None, cu_seqlens_k=None) -> Tensor:
    """attention's s (B, Hq, Sq, Sk) in the accumulation dtype, -inf where masked."""
    acc = acc_dtype(q.dtype)
    kf = k.to(acc).repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, Hq, Sk, D)
    s = (q.to(acc) @ kf.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(acc)
    if cu_seqlens_q is not None:
        keep = documents_keep(cu_seqlens_q, cu_seqlens_k, causal, window, q.device)
    else:
        keep = attention_keep(q.shape[-2], k.shape[-2], causal, window, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def attention_row_stats(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                        causal: bool = False, scale: float | None = None, window: int | None = None,
                        softcap: float | None = None, cu_seqlens_q: Tensor | None = None,
                        cu_seqlens_k: Tensor | None = None) -> Tensor:
    """The row stats the attention kernels' forward returns for the backward (csrc/ops.h):
    (2, B, Hq, Sq) in the accumulation dtype, [0] each row's max score m, [1] 1 / l with
    l = sum of exp(s - m); both 0 on a row that sees no key. Arguments as attention's (v unused:
    the signature matches so the error-budget checks can call both alike)."""
    s = _attention_scores(q, k, attn_mask, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k)
    m = s.amax(-1) if s.shape[-1] > 0 else s.new_full(s.shape[:-1], float("-inf"))  # (B, Hq, Sq)
    seen = m != float("-inf")
    m = torch.where(seen, m, 0.0)
    l = torch.exp(s - m.unsqueeze(-1)).sum(-1)
    return torch.stack((m, torch.where(seen, 1.0 / l, 0.0)))
