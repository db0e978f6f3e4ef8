"""FlashAttention's functional API on lmfast's kernels: code written against the flash-attn
package runs on any lmfast backend (the CPU included) by changing its import,

    from lmfast.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func

with flash-attn 2's signatures and meaning: (B, S, H, D) and packed (total, H, D) layouts,
bottom-right causal alignment, window_size=(left, right), softcap. What lmfast does not compute
(ALiBi slopes, a paged KV cache's block_table, a window reaching right of the diagonal other
than all keys, the attention probabilities of return_attn_probs) raises a ValueError naming
the argument, never a silent difference.
"""

from __future__ import annotations

from torch import Tensor

from .. import ops


def _window(window_size, causal: bool) -> tuple[bool, int | None]:
    """flash-attn's (left, right) window (-1: unbounded) -> lmfast's (causal, window): query i
    (at key position p) sees keys p - left <= j <= p + right; lmfast's window w keeps j > p - w."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right) of ints, -1 for unbounded; got {window_size!r}") \
            from None
    if causal:
        right = 0  # (flash-attn: causal=True sets the right window to 0)
    if right not in (-1, 0):
        raise ValueError(f"window_size={window_size!r}: lmfast's window reaches right of the diagonal to every key "
                         "(right = -1) or to none (right = 0, causal); use an attention mask for other right windows")
    if left < -1:
        raise ValueError(f"window_size's left must be >= 0, or -1 for unbounded; got {left}")
    return right == 0, None if left == -1 else left + 1


def _unsupported(alibi_slopes, return_attn_probs, block_table=None) -> None:
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes: lmfast's attention has no ALiBi bias; pass it as an additive mask to "
                         "lmfast.ops.attention")
    if return_attn_probs:
        raise ValueError("return_attn_probs=True: lmfast's kernels never form the attention probabilities "
                         "(use the model's eager attention where they are needed)")
    if block_table is not None:
        raise ValueError("block_table: lmfast's attention takes no paged KV cache; pass the cache packed "
                         "(cu_seqlens_k) instead")


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                    deterministic: bool = False, return_attn_probs: bool = False, *, backend: str = "auto"):
    """flash-attn's flash_attn_func: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) ->
    out (B, Sq, Hq, Dv). `deterministic` needs nothing: lmfast's backward is deterministic."""
    _unsupported(alibi_slopes, return_attn_probs)
    causal, window = _window(window_size, causal)
    o = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                      scale=None if softmax_scale is None else float(softmax_scale), window=window,
                      dropout_p=dropout_p, softcap=float(softcap) if softcap else None, backend=backend)
    return o.transpose(1, 2)  # (B, Sq, Hq, Dv), contiguous: the kernels write o so


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table=None, *, backend: str = "auto"):
    """flash-attn's flash_attn_varlen_func: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k,
    Hkv, Dv), documents cut by cu_seqlens_q / cu_seqlens_k (int32, (n + 1,)) -> out (total_q, Hq,
    Dv) (lmfast.ops.attention_varlen). max_seqlen_q / max_seqlen_k size flash-attn's grid; lmfast
    needs neither."""
    _unsupported(alibi_slopes, return_attn_probs, block_table)
    causal, window = _window(window_size, causal)
    return ops.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                scale=None if softmax_scale is None else float(softmax_scale), window=window,
                                dropout_p=dropout_p, softcap=float(softcap) if softcap else None, backend=backend)
