"""Scaled dot-product attention with grouped-query heads, masks, causal and sliding windows.

Layers as in norm.py: CPU tensors go through the C++ public op lmfast_C::attention; Triton
through the checks here and lmfast_triton::attention_{fwd,bwd} (autograd registered below).
Both run flash kernels, which never materialize the (Sq, Sk) scores (csrc/cpu/attention.cpp,
lmfast/kernels/attention.py). backend="torch" runs lmfast.reference.attention.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import reference
from . import _autocast, _checks
from ._common import (broadcast_mask_grad, cpp_ops, on_cpp_path, resolve_backend, triton_kernels, triton_op,
                      upstream_grad)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
              causal: bool = False, scale: float | None = None, window: int | None = None, *,
              dropout_p: float = 0.0, dropout_seed: Tensor | None = None, sinks: Tensor | None = None,
              softcap: float | None = None, cu_seqlens_q: Tensor | None = None,
              cu_seqlens_k: Tensor | None = None, return_lse: bool = False, backend: str = "auto"):
    """softmax(scale * q @ k^T + attn_mask) @ v over keys, per head.

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv), Hq a multiple of Hkv (grouped-query
    attention: query head h reads kv head h // (Hq // Hkv), nothing is repeated in memory). Dv may
    differ from D (DeepSeek's multi-head latent attention: D = 192, Dv = 128); every kernel
    takes it as it is, forward and backward.
    attn_mask: additive (q's dtype) or boolean (True = keep), broadcastable to (B, Hq, Sq, Sk).
        The kernels skip the key tiles a boolean mask drops whole for a block of queries (packed
        sequences' other documents, padded stretches); pass causal=True too where the mask is
        causal, and the tiles above the diagonal are skipped without reading the mask.
    causal: query i sees keys j <= i + Sk - Sq (bottom-right aligned, as KV-cache decoding
        needs; SDPA's is_causal is top-left aligned when Sq != Sk).
    window: w >= 1 keeps keys j > i + Sk - Sq - w; with causal, each query's w most recent keys.
    scale: defaults to D**-0.5.
    dropout_p: attention dropout, as SDPA's: each entry of softmax(...) is zeroed with
        probability dropout_p and the rest scaled by 1 / (1 - dropout_p), inside the kernel
        (nothing (Sq, Sk) is stored; the backward regenerates the mask). Pass it only in
        training, as SDPA's. The mask is a hash of (seed, row, key) (lmfast.reference.dropout_keep);
        the seed is drawn from torch's generator of q's device (torch.manual_seed fixes it) unless
        dropout_seed, an int64 tensor of one element, is given.
    sinks: attention sinks (gpt-oss), a (Hq,) floating tensor: each row's softmax also counts
        one more score, sinks[h], that has no value (so the row's weights sum to less than 1).
        Composed on every backend from the kernel's (o, lse) (_with_sinks); differentiable.
    softcap: logit softcapping (Gemma 2's attn_logit_softcapping), a positive number c: the
        scaled scores become c * tanh(scale * q @ k^T / c) before the mask is added; inside the
        kernels, forward and backward.
    cu_seqlens_q, cu_seqlens_k: packed documents (variable-length attention, FlashAttention's
        cu_seqlens): int32 or int64 tensors of shape (n + 1,) on q's device, q a batch of one.
        Document d holds query rows [cu_seqlens_q[d], cu_seqlens_q[d + 1]) and keys
        [cu_seqlens_k[d], cu_seqlens_k[d + 1]); each query sees its own document's keys only,
        with causal and window applied inside the document (bottom-right aligned, as above).
        Both start at 0, never decrease and end at Sq and Sk (checked: on a GPU by an
        asynchronous device assert). The kernels skip other documents' key tiles without any
        (Sq, Sk) mask; attn_mask, dropout, sinks and softcap combine with them.
        attention_varlen takes FlashAttention's (total, H, D) layout.
    Rows with every key masked give zeros (and lse = -inf, or the sink's logit), not NaN.
    Returns o (B, Hq, Sq, Dv), or (o, lse) with return_lse: lse (B, Hq, Sq), the log-sum-exp
    of each row's scaled, masked scores, in float32 (float64 for float64 inputs), without dropout.
    Under torch.autocast, q, k, v and an additive mask are cast to the autocast dtype, as SDPA's are.
    """
    if _autocast.any_enabled():
        dtype = _autocast.lower_precision_dtype("attention", q)
        if dtype is not None:
            q, k, v, attn_mask = _autocast.cast(dtype, q, k, v, attn_mask)
    if sinks is not None:
        _checks.floating_tensor("q", q)
        _checks.sinks(sinks, q)
        o, lse = attention(q, k, v, attn_mask, causal, scale, window, dropout_p=dropout_p, dropout_seed=dropout_seed,
                           softcap=softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=True,
                           backend=backend)
        o, lse = _with_sinks(o, lse, sinks, return_lse)
        return (o, lse) if return_lse else o
    if (type(causal) is bool and (scale is None or type(scale) is float) and (window is None or type(window) is int)
            and (attn_mask is None or isinstance(attn_mask, Tensor)) and isinstance(k, Tensor)
            and isinstance(v, Tensor) and type(dropout_p) in (float, int)
            and (dropout_seed is None or isinstance(dropout_seed, Tensor)) and (softcap is None or type(softcap) is float)
            and (cu_seqlens_q is None or isinstance(cu_seqlens_q, Tensor))
            and (cu_seqlens_k is None or isinstance(cu_seqlens_k, Tensor)) and on_cpp_path(backend, q)):
        o, lse = cpp_ops().attention.default(q, k, v, attn_mask, causal, scale, window,  # checks its arguments
                                             dropout_p, dropout_seed, softcap, cu_seqlens_q, cu_seqlens_k)
        return (o, lse) if return_lse else o
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.floating_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, S, D), got shape {tuple(t.shape)}")
    _checks.same_device_and_dtype("k", k, q, "q")
    _checks.same_device_and_dtype("v", v, q, "q")
    B, Hq, Sq, D = q.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must have the same (B, Hkv, Sk) (their head dims may differ), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k and v have batch size {k.shape[0]} but q has {B}")
    if k.shape[3] != D:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {D}; they must match")
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
    dropout_p = _checks.dropout(dropout_p, dropout_seed)
    softcap = None if softcap is None else _checks.softcap(softcap)
    _checks.documents(cu_seqlens_q, cu_seqlens_k, q)

    window = None if window is None else int(window)
    impl = resolve_backend(backend, "attention", q)
    if impl in ("cpu", "cuda"):  # the C++ op (CPU or CUDA kernels, by device), which draws the seed itself
        o, lse = cpp_ops().attention.default(q, k, v, attn_mask, causal, scale, window, dropout_p, dropout_seed,
                                             softcap, cu_seqlens_q, cu_seqlens_k)
        return (o, lse) if return_lse else o
    seed = None
    if dropout_p > 0:  # the mask's seed, on q's device, as the C++ op draws it
        seed = (torch.randint(1 << 62, (1,), device=q.device) if dropout_seed is None
                else dropout_seed.reshape(1).to(q.device))
    if impl == "torch":
        if cu_seqlens_q is not None:
            _checks.document_values(cu_seqlens_q, cu_seqlens_k, Sq, Sk)
        with _autocast.off(q):
            o, lse = reference.attention(q, k, v, attn_mask, causal, scale, window, dropout_p,
                                         None if seed is None else int(seed.item()), softcap=softcap,
                                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    else:
        mask4 = None if attn_mask is None else attn_mask.expand(B, Hq, Sq, Sk)  # a view
        o, lse, _ = triton_op("attention_fwd", _rows(q), _rows(k), _rows(v), mask4, scale, causal, window,
                              dropout_p, seed, softcap or 0.0, cu_seqlens_q, cu_seqlens_k)
    return (o, lse) if return_lse else o


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
                     causal: bool = False, scale: float | None = None, window: int | None = None,
                     dropout_p: float = 0.0, dropout_seed: Tensor | None = None, sinks: Tensor | None = None,
                     softcap: float | None = None, return_lse: bool = False, backend: str = "auto"):
    """Variable-length attention in FlashAttention's layout: q (total_q, Hq, D), k (total_k, Hkv, D),
    v (total_k, Hkv, Dv), the documents packed along the first dim as cu_seqlens_q and
    cu_seqlens_k say (see attention). Returns o (total_q, Hq, Dv) (contiguous: no copy), or
    (o, lse) with return_lse, lse (Hq, total_q). The other arguments as attention's."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-dim tensor (total, H, D), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    # (total, H, D) -> (1, H, total, D): views with a contiguous head dim, as the kernels take them
    out = attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                    causal=causal, scale=scale, window=window, dropout_p=dropout_p, dropout_seed=dropout_seed,
                    sinks=sinks, softcap=softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    return_lse=return_lse, backend=backend)
    o, lse = out if return_lse else (out, None)
    o = o.squeeze(0).transpose(0, 1)  # (total_q, Hq, Dv)
    return (o, lse.squeeze(0)) if return_lse else o


def _with_sinks(o: Tensor, lse: Tensor, sinks: Tensor, return_lse: bool) -> tuple[Tensor, Tensor | None]:
    """(o, lse) of attention without sinks -> with them (lse only if return_lse). A sink is one
    more score per row with a zero value: the softmax's sum grows from exp(lse) to
    exp(lse) + exp(sink), so each row of o scales by exp(lse - lse'), lse' = logaddexp(lse, sink).
    (Dropout, applied to the weights, commutes with that per-row scale.) In lse's dtype
    (float32; in float64 the sinks' gradient came out no more accurate: its error is lse's
    rounding), o rounded once more. (Not sigmoid(lse - sink), one op fewer: its backward,
    y (1 - y), cancels where y is near 1 and lost the sinks' gradient.) Few ops: decoding
    pays each one."""
    # -inf (no sink) taken as the lowest finite value: a row with every key masked then gets
    # exp(-inf - lowest) = 0, not exp(-inf + inf) = NaN (nor NaN gradients)
    sink = sinks.to(lse.dtype).clamp(min=torch.finfo(lse.dtype).min).view(1, -1, 1)  # (1, Hq, 1)
    total = torch.logaddexp(lse, sink)                                                # (B, Hq, Sq)
    o = (o.to(lse.dtype) * torch.exp(lse - total).unsqueeze(-1)).to(o.dtype)
    if not return_lse:
        return o, None
    return o, torch.where(torch.isneginf(sinks.view(1, -1, 1)), lse, total)  # (no sink: lse as it was, -inf too)


def _rows(t: Tensor) -> Tensor:
    """t with a contiguous head dim, as the kernels' forward takes it: the (B, S, H, D)
    projections models transpose to (B, H, S, D) pass without a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# ---- Triton ops (contracts as csrc/ops.h's) -------------------------------------------------
# The forward also returns row_stats (2, B, Hq, Sq) float32, each row's softmax max and 1 / sum,
# which the backward takes in place of lse: p = exp(s - m) / l, as precise as an unfused
# softmax's (lmfast/kernels/attention.py: _store_row_stats).

@torch.library.custom_op("lmfast_triton::attention_fwd", mutates_args=())
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool,
      window: int | None, dropout_p: float = 0.0, dropout_seed: Tensor | None = None,
      softcap: float = 0.0, cu_seqlens_q: Tensor | None = None,
      cu_seqlens_k: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    if cu_seqlens_q is not None and cu_seqlens_q.device.type == "cpu":
        # a ValueError naming the argument; on a GPU the kernels' band table checks them, one
        # launch with no sync (lmfast/kernels/attention.py: _document_bands); the backward takes
        # the forward's: checked once
        _checks.document_values(cu_seqlens_q, cu_seqlens_k, q.shape[2], k.shape[2])
    return triton_kernels().attention_fwd(q, k, v, mask, scale, causal, window, dropout_p, dropout_seed, softcap,
                                          cu_seqlens_q, cu_seqlens_k)


@torch.library.custom_op("lmfast_triton::attention_bwd", mutates_args=())
def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, row_stats: Tensor, dlse: Tensor | None,
      mask: Tensor | None, scale: float, causal: bool, window: int | None,
      mask_grad: bool, dropout_p: float = 0.0,
      dropout_seed: Tensor | None = None, softcap: float = 0.0, cu_seqlens_q: Tensor | None = None,
      cu_seqlens_k: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return triton_kernels().attention_bwd(dout, q, k, v, o, row_stats, dlse, mask, scale, causal, window, mask_grad,
                                          dropout_p, dropout_seed, softcap, cu_seqlens_q, cu_seqlens_k)


# ---- fake impls, shared by both namespaces; the Triton ops' autograd -----------------------

def _attention_fwd_fake(q, k, v, mask, scale, causal, window, dropout_p=0.0, dropout_seed=None, softcap=0.0,
                        cu_seqlens_q=None, cu_seqlens_k=None):
    B, Hq, Sq, _ = q.shape  # o: (B, Sq, Hq, Dv) memory seen as (B, Hq, Sq, Dv), as the kernels write it
    o = q.new_empty((B, Sq, Hq, v.shape[3])).transpose(1, 2)
    acc = reference.acc_dtype(q.dtype)
    return o, q.new_empty((B, Hq, Sq), dtype=acc), q.new_empty((2, B, Hq, Sq), dtype=acc)  # o, lse, row_stats


def _attention_bwd_fake(dout, q, k, v, o, row_stats, dlse, mask, scale, causal, window, mask_grad,
                        dropout_p=0.0, dropout_seed=None, softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None):
    acc = reference.acc_dtype(q.dtype)  # dmask: unrounded (csrc/ops.h)
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if mask_grad else (0,)
    dmask = q.new_empty(shape, dtype=acc)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _attention_setup(ctx, inputs, output):
    q, k, v, mask, scale, causal, window, dropout_p, dropout_seed, softcap, cu_seqlens_q, cu_seqlens_k = inputs
    o, lse, row_stats = output
    ctx.mark_non_differentiable(row_stats)
    ctx.scale, ctx.causal, ctx.window, ctx.dropout_p, ctx.softcap = scale, causal, window, dropout_p, softcap
    ctx.save_for_backward(q, k, v, o, row_stats, mask, dropout_seed, cu_seqlens_q, cu_seqlens_k)


def register_fakes(ns: str) -> None:
    """Fake impls of ns::attention_{fwd,bwd} (lmfast_C or lmfast_triton)."""
    torch.library.register_fake(f"{ns}::attention_fwd", _attention_fwd_fake)
    torch.library.register_fake(f"{ns}::attention_bwd", _attention_bwd_fake)


def _register_triton_autograd() -> None:
    """Autograd of lmfast_triton::attention_fwd (the C++ op's is in csrc/api.cpp)."""
    ops = torch.ops.lmfast_triton

    def attention_backward(ctx, do, dlse, _):
        q, k, v, o, row_stats, mask, dropout_seed, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        mask_grad = ctx.needs_input_grad[3]
        q, k, v, o = q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous()  # as the backward takes them
        dq, dk, dv, dmask = ops.attention_bwd(
            upstream_grad(do, o), q, k, v, o, row_stats, None if dlse is None else dlse.contiguous(), mask,
            ctx.scale, ctx.causal, ctx.window, mask_grad, ctx.dropout_p, dropout_seed, ctx.softcap, cu_seqlens_q,
            cu_seqlens_k)
        # dmask comes unrounded (csrc/ops.h): summed over the mask's broadcast dims, then rounded
        dmask = broadcast_mask_grad(dmask, mask, mask.dtype, softmax_invariant=False) if mask_grad else None
        return dq, dk, dv, dmask, None, None, None, None, None, None, None, None

    torch.library.register_autograd("lmfast_triton::attention_fwd", attention_backward, setup_context=_attention_setup)


register_fakes("lmfast_triton")
_register_triton_autograd()


# ---- backend "cuda": the CUDA key of lmfast_C::attention_bwd -------------------------------

_cuda_backward_library: torch.library.Library | None = None


def register_cuda_backward() -> None:
    """Registers the Triton backward as lmfast_C::attention_bwd's CUDA kernel (called once, by
    lmfast._extension, when lmfast._cuda loads). The CUDA C++ kernels cover the attention
    forward only; the C++ autograd (csrc/api.cpp) calls attention_bwd through the dispatcher,
    which lands here for CUDA tensors, with the CUDA forward's row stats (csrc/ops.h)."""
    global _cuda_backward_library
    if _cuda_backward_library is not None:
        return
    library = torch.library.Library("lmfast_C", "IMPL")

    def attention_bwd(dout, q, k, v, o, row_stats, dlse, mask, scale, causal, window, mask_grad, dropout_p=0.0,
                      dropout_seed=None, softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None):
        try:
            kernels = triton_kernels()
        except ImportError as e:
            raise RuntimeError("backend 'cuda' computes the attention backward with lmfast's Triton kernel, "
                               f"and triton cannot be imported ({e}); pip install 'lmfast[triton]'") from None
        return kernels.attention_bwd(dout, q, k, v, o, row_stats, dlse, mask, scale, causal, window, mask_grad,
                                     dropout_p, dropout_seed, softcap, cu_seqlens_q, cu_seqlens_k)

    library.impl("attention_bwd", attention_bwd, "CUDA")
    _cuda_backward_library = library
