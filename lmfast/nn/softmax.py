from __future__ import annotations

import torch
from torch import Tensor

from .. import ops


class Softmax(torch.nn.Module):
    """torch.nn.Softmax(dim) running lmfast.ops.softmax, with the op's fused extras:
    Softmax(dim=-1, scale=1.0, causal=False); forward(x, mask=None)."""

    def __init__(self, dim: int = -1, scale: float = 1.0, causal: bool = False, *, backend: str = "auto"):
        super().__init__()
        self.dim, self.scale, self.causal, self.backend = dim, scale, causal, backend

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return ops.softmax(x, self.dim, self.scale, mask, self.causal, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, causal={self.causal}"
