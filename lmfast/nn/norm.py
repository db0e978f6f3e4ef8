"""Norm modules: drop-ins with the parameters and state_dict keys of the modules they replace."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import ops


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm running lmfast.ops.layer_norm (same constructor, parameters,
    state_dict keys). A multi-dim `normalized_shape` normalizes the flattened trailing dims,
    as torch does. `backend` selects the lmfast backend ("auto" by default).

    forward(x, residual=None): with a residual returns (norm(x + residual), x + residual).
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None):
        w, b = self.weight, self.bias
        if (len(self.normalized_shape) == 1 and x.dim() > 0 and x.shape[-1] == self.normalized_shape[0]
                and (w is None or w.dtype == x.dtype) and (b is None or b.dtype == x.dtype)):
            # the common case, kept short: per-call overhead is what decoding pays per token
            return ops.layer_norm(x, w, b, self.eps, residual=residual, backend=self.backend)
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(f"x's trailing dims {tuple(x.shape[x.dim() - k:])} do not match "
                             f"normalized_shape {tuple(self.normalized_shape)}")
        flat = x.shape[:x.dim() - k] + (math.prod(self.normalized_shape),)
        w = None if self.weight is None else self.weight.reshape(-1).to(x.dtype)  # torch allows
        b = None if self.bias is None else self.bias.reshape(-1).to(x.dtype)      # mixed dtypes
        r = None if residual is None else residual.reshape(flat)
        out = ops.layer_norm(x.reshape(flat), w, b, self.eps, residual=r, backend=self.backend)
        if residual is None:
            return out.view(x.shape)
        return out[0].view(x.shape), out[1].view(x.shape)


class RMSNorm(torch.nn.Module):
    """RMSNorm with the constructor and state_dict of Hugging Face's LlamaRMSNorm (and the
    Qwen2/Mistral/... copies of it): RMSNorm(hidden_size, eps=1e-6), one parameter `weight`.

    Like those modules, it normalizes in float32 and returns `weight * normed` in the promoted
    dtype when the input's dtype differs from the weight's; when they match, the weight
    multiply is fused into the kernel.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.backend = backend

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def forward(self, x: Tensor, residual: Tensor | None = None):
        if x.dtype == self.weight.dtype:
            return ops.rms_norm(x, self.weight, self.variance_epsilon, residual=residual, backend=self.backend)
        out = ops.rms_norm(x, None, self.variance_epsilon, residual=residual, backend=self.backend)
        if residual is None:
            return self.weight * out
        return self.weight * out[0], out[1]

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
