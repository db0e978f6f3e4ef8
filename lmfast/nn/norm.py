"""Norm modules: drop-ins with the parameters, state_dict keys and attributes of the modules
they replace.

On CPU tensors a forward is one C++ op call (torch.ops.lmfast_C.*_norm, which checks its
arguments): decoding one token at a time runs a few dozen norms a token, so their per-call
cost is part of what lmfast must not make slower. Anything else goes through lmfast.ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import ops
from ..ops import _autocast, _checks
from ..ops._common import on_cpp_path
from ..ops.norm import layer_norm_as_given, rms_norm_as_given

_C = torch.ops.lmfast_C  # the C++ ops (resolved on first use, once the extension has loaded)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm running lmfast.ops.layer_norm (same constructor, parameters,
    state_dict keys and attributes, read on every call as torch's are). A multi-dim
    `normalized_shape` normalizes the flattened trailing dims, as torch does. `backend`
    selects the lmfast backend ("auto" by default).

    forward(x, residual=None): with a residual returns (norm(x + residual), x + residual).
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None):
        # Parameters read from _parameters: self.weight goes through nn.Module.__getattr__,
        # ~0.7 us each, a tenth of a decode-size call (a parametrized weight is not there, but
        # a property: then it is read as one)
        params = self._parameters
        w = params["weight"] if "weight" in params else self.weight
        b = params["bias"] if "bias" in params else self.bias
        return self._norm(x, residual, w, b)

    def _norm(self, x: Tensor, residual: Tensor | None, w: Tensor | None, b: Tensor | None):
        """The forward with these scale and shift tensors."""
        if (len(self.normalized_shape) == 1 and on_cpp_path(self.backend, x) and (w is None or w.dtype == x.dtype)
                and (b is None or b.dtype == x.dtype) and (w is not None or _last_dim_is(x, self.normalized_shape))):
            # the common case, one C++ call: per-call overhead is what decoding pays per token
            y, s = _C.layer_norm.default(x, w, b, residual, float(self.eps))
            return y if residual is None else (y, s)
        out_dtype = x.dtype  # of a mixed-dtype call
        if _autocast.any_enabled() and _autocast.runs_in_float32("layer_norm", x):
            # CUDA autocast runs torch's layer_norm in float32 and returns float32: so does this
            w, b, out_dtype = _autocast.float32(w), _autocast.float32(b), torch.float32
        if (len(self.normalized_shape) == 1 and x.dim() > 0 and x.shape[-1] == self.normalized_shape[0]
                and (w is None or w.dtype == x.dtype) and (b is None or b.dtype == x.dtype)):
            return ops.layer_norm(x, w, b, self.eps, residual=residual, backend=self.backend)
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(f"x's trailing dims {tuple(x.shape[x.dim() - k:])} do not match "
                             f"normalized_shape {tuple(self.normalized_shape)}")
        flat = x.shape[:x.dim() - k] + (math.prod(self.normalized_shape),)
        w = None if w is None else w.reshape(-1)
        b = None if b is None else b.reshape(-1)
        _checks.residual_like(residual, x)  # (before reshaping it: x's dtype and shape, as the ops check)
        xs, r = x.reshape(flat), None if residual is None else residual.reshape(flat)
        if x.is_floating_point() and ((w is not None and w.dtype != x.dtype) or (b is not None and b.dtype != x.dtype)):
            # mixed dtypes, as torch computes them (a 16-bit x with float32 parameters): with the
            # parameters as they are, in float32, returned in x's dtype (float32 under CUDA
            # autocast), rounded once. (Any other x goes to ops.layer_norm, whose check names it.)
            s = xs if r is None else xs + r
            y = ops.layer_norm(s.float(), None if w is None else w.float(), None if b is None else b.float(),
                               self.eps, backend=self.backend).to(out_dtype)
            out = y if r is None else (y, s)
        else:
            out = ops.layer_norm(xs, w, b, self.eps, residual=r, backend=self.backend)
        if residual is None:
            return out.view(x.shape)
        return out[0].view(x.shape), out[1].view(x.shape)


class LayerNorm1P(LayerNorm):
    """A LayerNorm that scales by 1 + weight: Nemotron's NemotronLayerNorm1P (Hugging Face
    transformers), whose `weight` is stored zero-centered. As it computes: weight + 1 in the
    weight's dtype (rounded there, as it rounds), then LayerNorm; under CUDA autocast (the only
    state it asks about) x, 1 + weight and bias are cast to the autocast dtype and normalized in
    it, with autocast off. Same constructor, parameters, state_dict and attributes as LayerNorm;
    forward(x, residual=None) as LayerNorm's."""

    def forward(self, x: Tensor, residual: Tensor | None = None):
        params = self._parameters
        w = params["weight"] if "weight" in params else self.weight
        b = params["bias"] if "bias" in params else self.bias
        w = None if w is None else w + 1.0
        if _autocast.any_enabled() and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w, b, residual = _autocast.cast(dtype, x, w, b, residual)
            with torch.autocast(x.device.type, enabled=False):
                return self._norm(x, residual, w, b)
        return self._norm(x, residual, w, b)


class _EpsAlias:
    """Hugging Face norms keep their epsilon as `variance_epsilon`, torch's and many others as
    `eps`: two names for one value, both readable and writable."""

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    @eps.setter
    def eps(self, value: float) -> None:
        self.variance_epsilon = value


class HFLayerNorm(_EpsAlias, torch.nn.Module):
    """A LayerNorm as Hugging Face's Python LayerNorms compute it (Cohere's and Cohere 2's:
    HFLayerNorm(hidden_size, eps=1e-5), one parameter `weight`, no bias): mean subtracted,
    normalized and scaled in float32, returned in x's dtype, rounded once, whatever the
    parameters' dtype; and, being Python code that autocast does not change, it returns that
    under autocast too (torch.nn.LayerNorm returns float32 under CUDA autocast: lmfast.nn.LayerNorm
    stands in for that one). The epsilon is `variance_epsilon`, as there, and also `eps`.
    bias=True adds a `bias` parameter, applied in float32 the same way.

    forward(x, residual=None): with a residual returns (norm(x + residual), x + residual).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = False, *, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.variance_epsilon = eps
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None):
        params = self._parameters  # (as in LayerNorm.forward)
        w = params["weight"] if "weight" in params else self.weight
        b = params["bias"] if "bias" in params else self.bias
        floating = isinstance(x, Tensor) and x.is_floating_point()
        same_dtype = floating and x.dtype == w.dtype and (b is None or b.dtype == x.dtype)
        if same_dtype and on_cpp_path(self.backend, x):
            y, s = _C.layer_norm.default(x, w, b, residual, float(self.variance_epsilon))  # one C++ call
            return y if residual is None else (y, s)
        if same_dtype or not floating:  # (anything but a floating tensor: the op's check names x)
            return layer_norm_as_given(x, w, b, self.variance_epsilon, residual, self.backend)
        # mixed dtypes: in float32, rounded once to x's dtype
        _checks.residual_like(residual, x)  # (x's dtype and shape, as the fused path checks)
        s = x if residual is None else x + residual
        y = layer_norm_as_given(s.float(), w.float(), None if b is None else b.float(), self.variance_epsilon,
                                None, self.backend).to(x.dtype)
        return y if residual is None else (y, s)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, bias={self.bias is not None}"


class TorchRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm running lmfast.ops.rms_norm: a subclass with the same constructor,
    parameters, state_dict keys and attributes (normalized_shape, eps, elementwise_affine,
    weight), read on every call as torch's are. It computes what torch's does: eps=None is
    float32's machine epsilon (float64's for a float64 x: what F.rms_norm uses; its docstring
    says x's dtype's), a multi-dim `normalized_shape` normalizes the flattened trailing dims, a
    weight in another dtype than x is applied in float32 and the result has x's dtype, and
    under CUDA autocast it runs in float32 and returns float32. `backend` selects the lmfast
    backend ("auto" by default). (lmfast.nn.RMSNorm is the Hugging Face-style one.)

    forward(x, residual=None): with a residual returns (norm(x + residual), x + residual).
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None):
        params = self._parameters  # (as in LayerNorm.forward)
        w = params["weight"] if "weight" in params else self.weight
        eps = self.eps if self.eps is not None else _default_rms_eps(x)
        if (len(self.normalized_shape) == 1 and type(eps) is float and on_cpp_path(self.backend, x)
                and (w is None or w.dtype == x.dtype) and (w is not None or _last_dim_is(x, self.normalized_shape))):
            y, s = _C.rms_norm.default(x, w, residual, eps, 0.0)  # one C++ call (it checks its arguments)
            return y if residual is None else (y, s)
        _checks.floating_tensor("x", x)
        out_dtype = x.dtype  # of a mixed-dtype call
        if _autocast.any_enabled() and _autocast.runs_in_float32("rms_norm", x):
            # CUDA autocast runs torch's rms_norm in float32 and returns float32: so does this
            w, out_dtype = _autocast.float32(w), torch.float32
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(f"x's trailing dims {tuple(x.shape[x.dim() - k:])} do not match "
                             f"normalized_shape {tuple(self.normalized_shape)}")
        _checks.residual_like(residual, x)  # (before reshaping it: x's dtype and shape, as the ops check)
        flat = x.shape[:x.dim() - k] + (math.prod(self.normalized_shape),)
        xs, r = x.reshape(flat), None if residual is None else residual.reshape(flat)
        w = None if w is None else w.reshape(-1)
        if w is not None and w.dtype != x.dtype:  # mixed dtypes: in float32, rounded once to out_dtype
            s = xs if r is None else xs + r
            y = ops.rms_norm(s.float(), w.float(), eps, backend=self.backend).to(out_dtype)
            out = y if r is None else (y, s)
        else:
            out = ops.rms_norm(xs, w, eps, residual=r, backend=self.backend)
        if residual is None:
            return out.view(x.shape)
        return out[0].view(x.shape), out[1].view(x.shape)


def _last_dim_is(x: Tensor, normalized_shape: tuple[int]) -> bool:
    """Whether x's last dim is the one normalized (with a weight, the op checks it against the
    weight's length; without one, nothing else would)."""
    return x.dim() > 0 and x.shape[-1] == normalized_shape[0]


def _default_rms_eps(x: object) -> float:
    """F.rms_norm's eps=None: the machine epsilon of the dtype it computes in (float32 for 16-bit
    x). (For anything but a floating tensor, 0.0: the op's checks then name x.)"""
    if isinstance(x, Tensor) and x.is_floating_point():
        return torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    return 0.0


class RMSNorm(_EpsAlias, torch.nn.Module):
    """RMSNorm with the constructor and state_dict of Hugging Face's LlamaRMSNorm (and the
    Qwen2/Mistral/... copies of it): RMSNorm(hidden_size, eps=1e-6), one parameter `weight`.
    The epsilon is `variance_epsilon`, as there, and also `eps`, as in torch.nn.RMSNorm and
    other Hugging Face norms: two names for one value, both readable and writable.

    When the input's dtype and the weight's match, the normalization and the weight multiply
    are one kernel, rounded once. When they differ, `casting` says what comes out, as the
    module being replaced does:
      "llama"    normalized in float32, rounded to the input's dtype, times the weight: the
                 promoted dtype (LlamaRMSNorm, Qwen2, Mistral...);
      "float32"  normalized and scaled in float32, returned in the input's dtype, rounded once
                 (GemmaRMSNorm, Olmo2RMSNorm, GptOssRMSNorm...);
      "t5"       normalized in float32, rounded to the weight's dtype if that is 16-bit, times
                 the weight: the promoted dtype (T5LayerNorm and its copies in MT5, LongT5,
                 UMT5, Switch Transformers, Pix2Struct, Pop2Piano, UDOP; IdeficsRMSNorm).

    weight_offset=1.0 makes it the zero-centered RMSNorm of Gemma, Qwen3-Next and Qwen3.5
    (GemmaRMSNorm...): the scale is 1 + weight, added in float32, and the weight starts at
    zeros. `casting` defaults to "float32" with an offset, as there, else "llama".
    """

    CASTINGS = ("llama", "float32", "t5")

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, weight_offset: float = 0.0,
                 casting: str | None = None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        casting = casting if casting is not None else ("float32" if weight_offset else "llama")
        if casting not in self.CASTINGS:
            raise ValueError(f"casting must be one of {self.CASTINGS}, got {casting!r}")
        # initialized so that the scale weight_offset + weight is 1
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 1.0 - weight_offset, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.weight_offset = float(weight_offset)
        self.casting = casting
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None):
        params = self._parameters  # (as in LayerNorm.forward)
        w = params["weight"] if "weight" in params else self.weight
        offset = self.weight_offset
        if on_cpp_path(self.backend, x) and x.dtype == w.dtype:
            y, s = _C.rms_norm.default(x, w, residual, float(self.variance_epsilon), float(offset))  # one C++ call
            return y if residual is None else (y, s)
        # (rms_norm_as_given, not ops.rms_norm: under CUDA autocast torch's rms_norm runs in
        # float32, but the Hugging Face RMSNorms this module stands in for are Python code that
        # autocast does not change)
        if x.dtype == w.dtype:
            return rms_norm_as_given(x, w, self.variance_epsilon, residual, offset, self.backend)
        if self.casting == "float32" and x.is_floating_point():  # in float32, rounded once to x's dtype
            # (any other x goes to rms_norm_as_given below, whose check names it)
            _checks.residual_like(residual, x)  # (x's dtype and shape, as the fused path checks)
            s = x if residual is None else x + residual
            y = rms_norm_as_given(s.float(), w.float(), self.variance_epsilon, None, offset, self.backend).to(x.dtype)
            return y if residual is None else (y, s)
        scale = w + offset if offset else w
        if self.casting == "t5" and x.is_floating_point():
            _checks.residual_like(residual, x)
            s = x if residual is None else x + residual
            normed = rms_norm_as_given(s if s.dtype == torch.float64 else s.float(), None, self.variance_epsilon, None,
                                       0.0, self.backend)  # (float32, float64 for a float64 x)
            if w.dtype in (torch.float16, torch.bfloat16):
                normed = normed.to(w.dtype)
            return scale * normed if residual is None else (scale * normed, s)
        # "llama": weight * (the normalized x, in x's dtype), in the promoted dtype
        out = rms_norm_as_given(x, None, self.variance_epsilon, residual, 0.0, self.backend)
        if residual is None:
            return scale * out
        return scale * out[0], out[1]

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}{offset}, casting={self.casting!r}"
