"""Attention as a module, for models and integrations that hold their attention as a module."""

from __future__ import annotations

from torch import Tensor, nn

from .. import ops


class Attention(nn.Module):
    """softmax(scale * q k^T + attn_mask) v per head, by lmfast.ops.attention (no parameters).

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq a multiple of Hkv. causal is bottom-right
    aligned (query i sees keys j <= i + Sk - Sq), window keeps each query's `window` most
    recent keys; see lmfast.ops.attention. Dropout on the attention weights is not supported:
    use it in eval mode, or where the model's attention dropout is 0.
    """

    def __init__(self, causal: bool = False, window: int | None = None, scale: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.causal, self.window, self.scale, self.backend = causal, window, scale, backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        return ops.attention(q, k, v, attn_mask, causal=self.causal, scale=self.scale, window=self.window,
                             backend=self.backend)

    def extra_repr(self) -> str:
        parts = [f"causal={self.causal}"]
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.scale is not None:
            parts.append(f"scale={self.scale}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
