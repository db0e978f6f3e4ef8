"""Hugging Face transformers integration: lmfast as an attention implementation.

Registers "lmfast" in transformers' attention-function registry and, beside it, a mask
function in its attention-mask registry (without one, a custom attention function receives
no padding mask). The mask function hands over no mask at all where the mask is exactly
bottom-right causal (or nothing), so the kernel runs with causal=True and skips masked key
blocks; otherwise it hands over SDPA's boolean mask (True = keep, as lmfast's), which the
kernel reads through its strides.
"""

from __future__ import annotations

import functools

import torch

from .. import ops

NAME = "lmfast"
BACKEND_ATTR = "_lmfast_backend"  # on attention layers: the lmfast backend lmfast.patch chose


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D)
    (not repeated for grouped-query attention), returns ((B, Sq, Hq, D), None)."""
    if dropout and module.training:
        raise NotImplementedError("lmfast attention has no attention dropout; train with attention dropout 0 "
                                  "(config.attention_dropout = 0.0) or use another attn_implementation")
    for unsupported in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"lmfast attention does not support {unsupported}")
    q_len = query.shape[2]
    causal = False
    if attention_mask is None:  # from _mask below: exactly bottom-right causal, or no mask
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)  # additive
    backend = getattr(module, BACKEND_ATTR, "auto")  # set by lmfast.patch
    out = ops.attention(query, key, value, attention_mask, causal=causal, scale=scaling, backend=backend)
    return out.transpose(1, 2).contiguous(), None


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, allow_is_causal_skip=True, **kwargs):
    """SDPA's boolean mask, or None where that is exactly what causal=True (bottom-right) or no
    mask computes: only when Sq = 1 or Sq = Sk. (SDPA's own skip also covers a prefill into an
    empty static cache, Sq < Sk with top-left causal alignment, which bottom-right is not.)"""
    from transformers.masking_utils import sdpa_mask

    skip = allow_is_causal_skip and (q_length == 1 or q_length == kv_length)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, allow_is_causal_skip=skip, **kwargs)


@functools.cache
def register() -> bool:
    """Registers "lmfast" with transformers (once); False if transformers is not importable."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return True
