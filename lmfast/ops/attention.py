"""Scaled dot-product attention with grouped-query heads, masks, causal and sliding windows.

Public function: validation and backend choice. The C++ and Triton flash kernels (which never
materialize the (Sq, Sk) scores) are being built (issue 3); until a backend implements the op,
"auto" runs the reference (lmfast.reference.attention) with one warning, and naming that
backend explicitly raises.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import reference
from . import _checks
from ._common import resolve_backend


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
              causal: bool = False, scale: float | None = None, window: int | None = None, *,
              return_lse: bool = False, backend: str = "auto"):
    """softmax(scale * q @ k^T + attn_mask) @ v over keys, per head.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D), Hq a multiple of Hkv (grouped-query attention:
    query head h reads kv head h // (Hq // Hkv), nothing is repeated in memory).
    attn_mask: additive (q's dtype) or boolean (True = keep), broadcastable to (B, Hq, Sq, Sk).
    causal: query i sees keys j <= i + Sk - Sq (bottom-right aligned, as KV-cache decoding
        needs; SDPA's is_causal is top-left aligned when Sq != Sk).
    window: w >= 1 keeps keys j > i + Sk - Sq - w; with causal, each query's w most recent keys.
    scale: defaults to D**-0.5.
    Rows with every key masked give zeros (and lse = -inf), not NaN.
    Returns o (B, Hq, Sq, D), or (o, lse) with return_lse: lse (B, Hq, Sq) float32, the
    log-sum-exp of each row's scaled, masked scores.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.floating_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, S, D), got shape {tuple(t.shape)}")
    _checks.same_device_and_dtype("k", k, q)
    _checks.same_device_and_dtype("v", v, q)
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, Sk, D), got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k and v have batch size {k.shape[0]} but q has {B}")
    if k.shape[3] != D:
        raise ValueError(f"k and v have head dim {k.shape[3]} but q has {D}; they must match")
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's {Hq} heads must be a multiple of k's and v's {Hkv} heads")
    _checks.mask_for(attn_mask, q, (B, Hq, Sq, Sk), name="attn_mask", shape_name="(B, Hq, Sq, Sk) =")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral)):
        raise TypeError(f"window must be an int or None, got {type(window).__name__}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (the number of keys each query sees), got {window}")
    scale = D ** -0.5 if scale is None else _checks.real_number("scale", scale)

    impl = resolve_backend(backend, "attention", q)
    assert impl == "torch", impl  # no kernel backend implements attention yet (KERNEL_OPS)
    o, lse = reference.attention(q, k, v, attn_mask, causal, scale, None if window is None else int(window))
    return (o, lse.float()) if return_lse else o
