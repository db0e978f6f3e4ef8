"""Attention as a module, for models and integrations that hold their attention as a module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class Attention(nn.Module):
    """softmax(scale * q k^T + attn_mask) v per head, by lmfast.ops.attention (no parameters).

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq a multiple of Hkv. causal is bottom-right
    aligned (query i sees keys j <= i + Sk - Sq), window keeps each query's `window` most
    recent keys; see lmfast.ops.attention. dropout: dropped from the attention weights in
    training mode only (as nn.MultiheadAttention's).
    """

    def __init__(self, causal: bool = False, window: int | None = None, scale: float | None = None,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.causal, self.window, self.scale, self.dropout, self.backend = causal, window, scale, dropout, backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        return ops.attention(q, k, v, attn_mask, causal=self.causal, scale=self.scale, window=self.window,
                             dropout_p=self.dropout if self.training else 0.0, backend=self.backend)

    def extra_repr(self) -> str:
        parts = [f"causal={self.causal}"]
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.scale is not None:
            parts.append(f"scale={self.scale}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention computed by lmfast.ops.attention.

    Same constructor, parameters, state_dict and forward signature as torch's, so it drops into
    TransformerEncoderLayer / TransformerDecoderLayer / nn.Transformer (lmfast.patch swaps it in
    sharing the original's Parameters; `from_torch` does that). Calls lmfast serves: need_weights=False,
    no add_bias_kv / add_zero_attn. Any other call runs torch's own forward unchanged, so the
    module always computes what torch's does. Attention dropout (training mode) is the kernel's:
    the same distribution as torch's, another random mask (lmfast.ops.attention).

    Masks keep torch's meaning: a boolean attn_mask / key_padding_mask marks with True what must
    NOT be attended (lmfast's boolean masks mark what is kept); float masks are added to the
    scores. attn_mask is (L, S) or (B * num_heads, L, S); key_padding_mask is (B, S).
    is_causal=True (a hint that attn_mask is the causal mask) with L = S runs the kernel with
    causal=True and skips the masked key blocks; for L != S the attn_mask itself is used.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, backend: str = "auto") -> "MultiheadAttention":
        """An lmfast MultiheadAttention holding `module`'s Parameter objects (not copies)."""
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                  vdim=module.vdim, batch_first=module.batch_first, backend=backend, device="meta")
        for name, param in module._parameters.items():  # (None where torch's module has none)
            setattr(new, name, param)
        new.out_proj = module.out_proj  # the same Linear, so the same Parameters
        new.train(module.training)
        return new

    def _served(self, need_weights: bool) -> bool:
        return not need_weights and self.bias_k is None and not self.add_zero_attn

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if not self._served(need_weights):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint that attn_mask is the causal mask, but attn_mask is None "
                             "(as torch.nn.MultiheadAttention, lmfast needs the mask)")
        shared = (query is key, key is value)  # before the transposes make new objects of them
        unbatched = query.dim() == 2
        if unbatched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value, *shared)
        B, L, S = q.shape[0], q.shape[1], k.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        q = q.view(B, L, heads, head_dim).transpose(1, 2)  # (B, H, L, D)
        k = k.view(B, S, heads, head_dim).transpose(1, 2)  # (B, H, S, D)
        v = v.view(B, S, heads, head_dim).transpose(1, 2)
        causal = bool(is_causal) and L == S
        mask = _lmfast_mask(None if causal else attn_mask, key_padding_mask, B, heads, L, S, q.dtype)
        o = ops.attention(q, k, v, mask, causal=causal, dropout_p=self.dropout if self.training else 0.0,
                          backend=self.backend)  # (B, H, L, D)
        out = self.out_proj(o.transpose(1, 2).reshape(B, L, self.embed_dim))  # (B, L, E)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _project(self, query: Tensor, key: Tensor, value: Tensor, query_is_key: bool,
                 key_is_value: bool) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, L, E), k and v (B, S, E) through the input projections (one matmul for self-attention)."""
        E = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        if query_is_key and key_is_value:
            return F.linear(query, w, b).chunk(3, dim=-1)
        bq, bkv = (None, None) if b is None else (b[:E], b[E:])
        q = F.linear(query, w[:E], bq)
        if key_is_value:
            k, v = F.linear(key, w[E:], bkv).chunk(2, dim=-1)
            return q, k, v
        bk, bv = (None, None) if b is None else (b[E:2 * E], b[2 * E:])
        return q, F.linear(key, w[E:2 * E], bk), F.linear(value, w[2 * E:], bv)


def _lmfast_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, B: int, heads: int, L: int, S: int,
                 dtype) -> Tensor | None:
    """torch's attn_mask ((L, S) or (B * heads, L, S)) and key_padding_mask ((B, S)), where a boolean
    True means "masked", as one lmfast mask broadcastable to (B, heads, L, S): boolean (True =
    keep) if both are boolean, else additive in `dtype`."""
    parts = []
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            parts.append(attn_mask.view(1, 1, L, S))
        elif attn_mask.dim() == 3 and attn_mask.shape[0] == B * heads:
            parts.append(attn_mask.view(B, heads, L, S))
        else:
            raise ValueError(f"attn_mask must be (L, S) = ({L}, {S}) or (B * num_heads, L, S) = "
                             f"({B * heads}, {L}, {S}), got shape {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must be (B, S) = ({B}, {S}), got shape "
                             f"{tuple(key_padding_mask.shape)}")
        parts.append(key_padding_mask.view(B, 1, 1, S))
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        keep = ~parts[0]
        for p in parts[1:]:
            keep = keep & ~p
        return keep
    additive = [p.to(dtype) if p.is_floating_point() else
                torch.zeros(p.shape, dtype=dtype, device=p.device).masked_fill_(p, float("-inf")) for p in parts]
    out = additive[0]
    for p in additive[1:]:
        out = out + p
    return out
