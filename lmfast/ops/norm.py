"""LayerNorm and RMSNorm over the last dim, with an optional fused residual add.

Layers. CPU tensors (backend "cpu", or "auto"): one call of the C++ public op
lmfast_C::{layer,rms}_norm, which checks the arguments and calls the kernel op
lmfast_C::{layer,rms}_norm_{fwd,bwd} (csrc/api.cpp; autograd in C++). Triton: the checks here
(_checks), then the custom ops lmfast_triton::{layer,rms}_norm_{fwd,bwd} defined below, with
autograd registered here. Both namespaces' kernel ops get the fake impls below, so
torch.compile traces them without graph breaks. backend="torch" runs lmfast.reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from . import _autocast, _checks
from ._common import (as_rows, cpp_ops, on_cpp_path, resolve_backend, tensors_or_none, triton_kernels, triton_op,
                      upstream_grad)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, *, residual: Tensor | None = None, backend: str = "auto"):
    """LayerNorm over the last dim: (s - mean) / sqrt(var + eps) * weight + bias.

    With `residual`, s = x + residual is formed in the same pass and (y, s) is returned, the
    pre-norm residual pattern `s = x + r; y = norm(s)`; otherwise s = x and y is returned.
    x: (..., N); weight, bias: (N,) or None. float16/bfloat16/float32 (float64 on the cpu and
    torch backends), accumulated in float32.
    """
    if type(eps) is float and on_cpp_path(backend, x) and tensors_or_none(weight, bias, residual):
        y, s = cpp_ops().layer_norm.default(x, weight, bias, residual, eps)  # checks its arguments
        return y if residual is None else (y, s)
    if _autocast.any_enabled() and _autocast.runs_in_float32("layer_norm", x):  # as torch's layer_norm (CUDA)
        w, b = _autocast.float32(weight), _autocast.float32(bias)
        return _in_float32(x, residual, lambda x, r: layer_norm_as_given(x, w, b, eps, r, backend))
    return layer_norm_as_given(x, weight, bias, eps, residual, backend)


def _in_float32(x, residual, norm):
    """A norm as torch's runs under CUDA autocast: in float32, returning float32, and with a
    residual, s = x + residual as the add computes it (autocast leaves adds alone: x's dtype).
    norm(x, residual) runs the norm with float32 parameters."""
    _checks.residual_like(residual, x)
    if x.dtype == torch.float32:
        return norm(x, residual)
    s = x if residual is None else x + residual
    y = norm(s.float(), None)
    return y if residual is None else (y, s)


def layer_norm_as_given(x, weight, bias, eps, residual, backend):
    """layer_norm on the dtypes given, whatever autocast says (past the C++ fast path; also
    lmfast.nn.HFLayerNorm's, which stands in for Hugging Face LayerNorms, Python code that
    autocast does not change): checks, then the backend's kernel."""
    _checks.floating_tensor("x", x)
    _checks.norm_param("weight", weight, x)
    _checks.norm_param("bias", bias, x)
    _checks.residual_like(residual, x)
    eps = _checks.real_number("eps", eps, minimum=0.0)
    impl = resolve_backend(backend, "layer_norm", x)
    if impl == "torch":
        with _autocast.off(x):
            return reference.layer_norm(x, weight, bias, eps, residual)
    if impl in ("cpu", "cuda"):  # the C++ op (CPU or CUDA kernels, by device)
        y, s = cpp_ops().layer_norm.default(x, weight, bias, residual, eps)
        return y if residual is None else (y, s)
    y, s, _, _ = triton_op("layer_norm_fwd", as_rows(x), _vec(weight), _vec(bias),
                           None if residual is None else as_rows(residual), eps)
    return y.view_as(x) if residual is None else (y.view_as(x), s.view_as(x))


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, *,
             residual: Tensor | None = None, weight_offset: float = 0.0, backend: str = "auto"):
    """RMSNorm over the last dim: s / sqrt(mean(s^2) + eps) * (weight_offset + weight).

    `residual` as in layer_norm: returns (y, x + residual) when given. weight_offset=1.0 is
    the zero-centered weight of Gemma, Qwen3-Next and Qwen3.5 (their RMSNorm scales by
    1 + weight), added in float32; it needs a weight.
    """
    if (type(eps) is float and type(weight_offset) is float and on_cpp_path(backend, x)
            and tensors_or_none(weight, residual)):
        y, s = cpp_ops().rms_norm.default(x, weight, residual, eps, weight_offset)  # checks its arguments
        return y if residual is None else (y, s)
    if _autocast.any_enabled() and _autocast.runs_in_float32("rms_norm", x):  # as torch's rms_norm (CUDA)
        w = _autocast.float32(weight)
        return _in_float32(x, residual, lambda x, r: rms_norm_as_given(x, w, eps, r, weight_offset, backend))
    return rms_norm_as_given(x, weight, eps, residual, weight_offset, backend)


def rms_norm_as_given(x, weight, eps, residual, weight_offset, backend):
    """rms_norm on the dtypes given, whatever autocast says (lmfast.nn.RMSNorm stands in for
    Hugging Face RMSNorms, Python code that autocast does not change): checks, then the
    backend's kernel."""
    _checks.floating_tensor("x", x)
    _checks.norm_param("weight", weight, x)
    _checks.residual_like(residual, x)
    eps = _checks.real_number("eps", eps, minimum=0.0)
    weight_offset = _checks.weight_offset(weight_offset, weight)
    impl = resolve_backend(backend, "rms_norm", x)
    if impl == "torch":
        with _autocast.off(x):
            return reference.rms_norm(x, weight, eps, residual, weight_offset)
    if impl in ("cpu", "cuda"):  # the C++ op (CPU or CUDA kernels, by device)
        y, s = cpp_ops().rms_norm.default(x, weight, residual, eps, weight_offset)
        return y if residual is None else (y, s)
    y, s, _ = triton_op("rms_norm_fwd", as_rows(x), _vec(weight), None if residual is None else as_rows(residual), eps,
                        weight_offset)
    return y.view_as(x) if residual is None else (y.view_as(x), s.view_as(x))


def _vec(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


# ---- Triton ops (contracts as in csrc/ops.h; a test checks the schemas match lmfast_C) ---

@torch.library.custom_op("lmfast_triton::layer_norm_fwd", mutates_args=())
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
      eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return triton_kernels().layer_norm_fwd(x, weight, bias, residual, eps)


@torch.library.custom_op("lmfast_triton::layer_norm_bwd", mutates_args=())
def _(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
      dresidual_out: Tensor | None, weight_grad: bool, bias_grad: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return triton_kernels().layer_norm_bwd(dy, x, weight, mean, rstd, dresidual_out, weight_grad, bias_grad, eps)


@torch.library.custom_op("lmfast_triton::rms_norm_fwd", mutates_args=())
def _(x: Tensor, weight: Tensor | None, residual: Tensor | None, eps: float,
      weight_offset: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    return triton_kernels().rms_norm_fwd(x, weight, residual, eps, weight_offset)


@torch.library.custom_op("lmfast_triton::rms_norm_bwd", mutates_args=())
def _(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, dresidual_out: Tensor | None,
      weight_grad: bool, eps: float, weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    return triton_kernels().rms_norm_bwd(dy, x, weight, rstd, dresidual_out, weight_grad, eps, weight_offset)


# ---- fake impls, shared by both namespaces; the Triton ops' autograd -----------------------

def _stats(x: Tensor) -> Tensor:
    """A per-row statistic of (..., N) x: shaped x.shape[:-1], in the accumulation dtype."""
    return x.new_empty(x.shape[:-1], dtype=reference.acc_dtype(x.dtype))


def _param_grad(flag: bool, x: Tensor) -> Tensor:
    return x.new_empty(x.shape[-1]) if flag else x.new_empty(0)


def _residual_out(residual: Tensor | None, x: Tensor) -> Tensor:
    return torch.empty_like(x) if residual is not None else x.new_empty(0)


def _layer_norm_fwd_fake(x, weight, bias, residual, eps):
    return torch.empty_like(x), _residual_out(residual, x), _stats(x), _stats(x)


def _layer_norm_bwd_fake(dy, x, weight, mean, rstd, dresidual_out, weight_grad, bias_grad, eps):
    return torch.empty_like(x), _param_grad(weight_grad, x), _param_grad(bias_grad, x)


def _rms_norm_fwd_fake(x, weight, residual, eps, weight_offset=0.0):
    return torch.empty_like(x), _residual_out(residual, x), _stats(x)


def _rms_norm_bwd_fake(dy, x, weight, rstd, dresidual_out, weight_grad, eps, weight_offset=0.0):
    return torch.empty_like(x), _param_grad(weight_grad, x)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    _, s, mean, rstd = output
    ctx.has_residual, ctx.eps = residual is not None, eps
    ctx.save_for_backward(s if ctx.has_residual else x, weight, mean, rstd)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, eps, weight_offset = inputs
    _, s, rstd = output
    ctx.has_residual, ctx.eps, ctx.weight_offset = residual is not None, eps, weight_offset
    ctx.save_for_backward(s if ctx.has_residual else x, weight, rstd)


def register_fakes(ns: str) -> None:
    """Fake impls of ns::{layer,rms}_norm_{fwd,bwd} (lmfast_C or lmfast_triton)."""
    for name, fake in (("layer_norm_fwd", _layer_norm_fwd_fake), ("layer_norm_bwd", _layer_norm_bwd_fake),
                       ("rms_norm_fwd", _rms_norm_fwd_fake), ("rms_norm_bwd", _rms_norm_bwd_fake)):
        torch.library.register_fake(f"{ns}::{name}", fake)


def _register_triton_autograd() -> None:
    """Autograd of the Triton forward ops (the C++ ones have theirs in csrc/api.cpp)."""
    ops = torch.ops.lmfast_triton

    def layer_norm_backward(ctx, dy, ds, _dmean, _drstd):
        normed, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        ds = upstream_grad(ds, normed) if ctx.has_residual else None
        dx, dw, db = ops.layer_norm_bwd(upstream_grad(dy, normed), normed, weight, mean, rstd, ds,
                                        need_w, need_b, ctx.eps)
        return (dx if need_x else None, dw if need_w else None, db if need_b else None,
                dx if need_r else None, None)

    def rms_norm_backward(ctx, dy, ds, _drstd):
        normed, weight, rstd = ctx.saved_tensors
        need_x, need_w, need_r = ctx.needs_input_grad[:3]
        ds = upstream_grad(ds, normed) if ctx.has_residual else None
        dx, dw = ops.rms_norm_bwd(upstream_grad(dy, normed), normed, weight, rstd, ds, need_w, ctx.eps,
                                  ctx.weight_offset)
        return dx if need_x else None, dw if need_w else None, dx if need_r else None, None, None

    torch.library.register_autograd("lmfast_triton::layer_norm_fwd", layer_norm_backward,
                                    setup_context=_layer_norm_setup)
    torch.library.register_autograd("lmfast_triton::rms_norm_fwd", rms_norm_backward, setup_context=_rms_norm_setup)


register_fakes("lmfast_triton")
_register_triton_autograd()
