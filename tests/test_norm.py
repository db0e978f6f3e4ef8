"""LayerNorm and RMSNorm: every kernel backend against the float64 reference under the error
budget (lmfast.testing), forward and gradients."""

import pytest
import torch

import lmfast
from lmfast import reference
from lmfast.testing import check_against_reference

WIDTHS = [1, 7, 127, 1000, 4097, 16384]
OPS = {
    "layer_norm": (lmfast.ops.layer_norm, reference.layer_norm, ("weight", "bias")),
    "rms_norm": (lmfast.ops.rms_norm, reference.rms_norm, ("weight",)),
}


def _inputs(op, shape, dtype, device, *, params=True, residual=True, eps=1e-5):
    _, _, param_names = OPS[op]
    n = shape[-1]
    inputs = {"x": torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5, "eps": eps}
    for p in param_names:
        inputs[p] = (torch.randn(n, dtype=dtype, device=device) if params else None)
    inputs["residual"] = torch.randn(shape, dtype=dtype, device=device) if residual else None
    return inputs


def _check(op, backend, inputs, name, trials=1):
    fn, ref, _ = OPS[op]
    example = inputs() if callable(inputs) else inputs
    grad = [k for k, v in example.items() if isinstance(v, torch.Tensor)]
    check_against_reference(lambda **kw: fn(**kw, backend=backend), ref, inputs, grad=grad,
                            name=name, trials=trials)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("width", WIDTHS)
def test_forward_and_grads_all_widths(op, width, kb, dtype):
    # The weight gradient has `width` values: narrow rows pool errors over more trials.
    trials = -(-16 // width)
    _check(op, kb.name, lambda: _inputs(op, (kb.rows(67), width), dtype, kb.device),
           f"{op} {kb.name} w={width}", trials=trials)


@pytest.mark.parametrize("op", OPS)
def test_rows_too_long_for_registers(op, kb, dtype):
    # 40000 > 32 elements x 1024 threads: the CUDA forward's looped (three-read) path and the
    # backward's weight-gradient partials in memory; other backends take it as any wide row.
    _check(op, kb.name, lambda: _inputs(op, (16, 40000), dtype, kb.device), f"{op} {kb.name} w=40000")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("params", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_optional_arguments(op, params, residual, kb, dtype):
    inputs = _inputs(op, (2, kb.rows(9, 8), 129), dtype, kb.device, params=params, residual=residual)
    _check(op, kb.name, inputs, f"{op} {kb.name} params={params} residual={residual}")


@pytest.mark.parametrize("op", OPS)
def test_bias_only_layer_norm_and_weight_only(op, kb):
    inputs = _inputs(op, (17, 33), torch.float32, kb.device)
    if op == "layer_norm":
        inputs["weight"] = None
    _check(op, kb.name, inputs, f"{op} {kb.name} partial params")


@pytest.mark.parametrize("op", OPS)
def test_wide_rows_loop_over_blocks(op, kb, dtype, small_triton_blocks):
    # 1000 = 3 full 256-blocks + a partial one for Triton; the C++ kernels always loop.
    inputs = _inputs(op, (kb.rows(13), 1000), dtype, kb.device)
    _check(op, kb.name, inputs, f"{op} {kb.name} looping")


@pytest.mark.parametrize("width,residual", [(1, True), (7, False), (129, True), (1000, True)],
                         ids=["w1-exact-rows", "w7-exact-rows", "w129", "w1000-looping"])
def test_rms_norm_weight_offset(width, residual, kb, dtype, small_triton_blocks):
    """weight_offset=1: Gemma's scale 1 + weight, on every path of every kernel (the float64
    short rows, one block, Triton's loop over 256-wide blocks), forward and gradients of x,
    weight and residual, against the float64 reference. The weight is drawn around 0, as
    Gemma's are: without the offset the output would be off by a whole x * rstd."""
    def inputs():
        out = _inputs("rms_norm", (kb.rows(33), width), dtype, kb.device, residual=residual)
        out["weight"] = out["weight"] * 0.1
        return out | {"weight_offset": 1.0}
    _check("rms_norm", kb.name, inputs, f"rms_norm {kb.name} w={width} weight_offset=1", trials=-(-16 // width))


@pytest.mark.parametrize("offset", [0.0, 0.5, -2.0])
def test_rms_norm_weight_offset_gradcheck_cpu_float64(offset):
    x, r = (torch.randn(4, 9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, r: lmfast.ops.rms_norm(x, w, residual=r, weight_offset=offset, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, r))
    # and the 2-element rows of the float64 short-row backward
    assert torch.autograd.gradcheck(f, (x[:, :2].detach().requires_grad_(), w[:2].detach().requires_grad_(),
                                        r[:, :2].detach().requires_grad_()))


def test_rms_norm_weight_offset_zero_keeps_the_bits(kb):
    """weight_offset=0 must not be added: w + 0 would turn a -0 weight into +0 (and the sign of
    a zero output with it)."""
    x = torch.randn(5, 40, device=kb.device)
    w = torch.randn(40, device=kb.device)
    w[::3] = -0.0
    a = lmfast.ops.rms_norm(x, w, backend=kb.name)
    b = lmfast.ops.rms_norm(x, w, weight_offset=0.0, backend=kb.name)
    assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())
    assert torch.equal(a.signbit(), (x * w).signbit())


def test_residual_sum_rounds_special_values_as_eager(kb):
    """The residual sum's rounding to bfloat16 on values that test it: ties (to even, up and
    down), sums that overflow to inf, denormal sums, NaN, signed zeros, at even and odd positions
    of a row whose last chunk is partial (the C++ kernels handle a chunk's even and odd elements
    apart: Chunk::load_paired in csrc/cpu/vec.h). The bits are eager's, but a NaN's payload."""
    ties = [(1.0, 2 ** -8), (1 + 2 ** -7, 2 ** -8), (-1.0, -(2 ** -8)), (2.0 ** 120, 2.0 ** 112)]
    specials = [3e38, -3e38, float("nan"), 1e-39, -1e-39, 0.0, -0.0, float("inf")]
    pairs = ties + [(a, b) for a in specials for b in (specials[0], specials[3], -0.0)]
    x = torch.randn(2, 67).to(torch.bfloat16)
    r = torch.randn(2, 67).to(torch.bfloat16)
    for k, (a, b) in enumerate(pairs):  # every other one at an odd position
        x.view(-1)[2 * k + k % 2], r.view(-1)[2 * k + k % 2] = a, b
    want = x + r  # eager: the float32 sum rounded once
    assert want.view(-1)[0] == 1.0 and want.view(-1)[3] == 1 + 2 ** -6  # the ties are ties
    for fn in (lmfast.ops.layer_norm, lmfast.ops.rms_norm):
        _, s = fn(x.to(kb.device), residual=r.to(kb.device), backend=kb.name)
        s = s.cpu()
        assert torch.equal(s.isnan(), want.isnan())
        same = ~want.isnan()
        if kb.slow:  # Triton's interpreter casts float32 denormals to bfloat16 as 2**-127 (a GPU rounds them)
            same &= want.float().abs() >= torch.finfo(torch.float32).tiny
        assert torch.equal(s[same].view(torch.int16), want[same].view(torch.int16))


@pytest.mark.parametrize("op", OPS)
def test_bfloat16_denormal_outputs_are_rounded_not_flushed(op):
    """A weight of ~1e-39 makes the outputs bfloat16 denormals. The C++ kernels' AVX512-BF16
    conversion (csrc/cpu/vec.h, from_float) flushes those to zero, so their chunks must take the
    rounding conversion: every output within one denormal ulp of the float64 reference's, and
    zero only where that is. (That path runs where the avx512bf16 kernels load, on CPUs with
    AVX512-BF16; elsewhere this checks the plain rounding.)"""
    fn, ref, _ = OPS[op]
    x = torch.randn(4, 100).to(torch.bfloat16)
    w = torch.full((100,), 1e-39).to(torch.bfloat16)
    w[::7] = 1.0  # normal outputs in the same chunks
    got = fn(x, w, eps=1e-5, backend="cpu")
    want = ref(x.double(), w.double(), eps=1e-5).to(torch.bfloat16)
    assert (want[:, 1:7] != 0).all() and (want[:, 1:7].float().abs() < torch.finfo(torch.float32).tiny).all()
    assert torch.equal(got != 0, want != 0)
    # (one ulp: the float32 arithmetic before the rounding differs from the reference's)
    torch.testing.assert_close(got.double(), want.double(), rtol=2 ** -7, atol=2.0 ** -133)  # a denormal ulp


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op, kb):
    base = torch.randn(40, kb.rows(30), device=kb.device)
    x = base.t()  # (rows, 40), stride (1, rows)
    res = torch.randn(40, 2 * x.shape[0], device=kb.device)[:, ::2].t()
    inputs = _inputs(op, x.shape, torch.float32, kb.device)
    inputs["x"], inputs["residual"] = x, res
    assert not x.is_contiguous() and not res.is_contiguous()
    _check(op, kb.name, inputs, f"{op} {kb.name} non-contiguous")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 16), (4, 0)], ids=["no-rows", "no-rows-3d", "width-0"])
def test_empty(op, shape, kb):
    fn, ref, _ = OPS[op]
    inputs = _inputs(op, shape, torch.float32, kb.device)
    y, s = fn(**inputs, backend=kb.name)
    assert y.shape == shape and s.shape == shape


@pytest.mark.parametrize("op", OPS)
def test_empty_gradients(op, kb):
    fn, _, params = OPS[op]
    inputs = _inputs(op, (0, 16), torch.float32, kb.device)
    leaves = [v.requires_grad_() for v in inputs.values() if isinstance(v, torch.Tensor)]
    y, s = fn(**inputs, backend=kb.name)
    grads = torch.autograd.grad((y, s), leaves, (torch.ones_like(y), torch.ones_like(s)))
    for leaf, g in zip(leaves, grads):
        assert g.shape == leaf.shape
        assert torch.count_nonzero(g) == 0  # no rows: every gradient is exactly zero


@pytest.mark.parametrize("op", OPS)
def test_float64_on_cpu_backend(op):
    # No oracle beyond float64, so torch.testing's float64 defaults (see lmfast.testing).
    fn, ref, _ = OPS[op]
    inputs = _inputs(op, (37, 300), torch.float64, "cpu")
    leaves = [v.requires_grad_() for v in inputs.values() if isinstance(v, torch.Tensor)]
    got, want = fn(**inputs, backend="cpu"), ref(**inputs)
    torch.testing.assert_close(got, want)
    dys = [torch.randn_like(t) for t in want]
    torch.testing.assert_close(torch.autograd.grad(got, leaves, dys), torch.autograd.grad(want, leaves, dys))


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_cpu_float64(op):
    fn, _, params = OPS[op]
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    ps = [torch.randn(9, dtype=torch.float64, requires_grad=True) for _ in params]

    def f(x, r, *ps):
        return fn(x, *ps, residual=r, backend="cpu")

    assert torch.autograd.gradcheck(f, (x, r, *ps))


@pytest.mark.parametrize("op", OPS)
def test_3d_input_and_eps(op, kb, dtype):
    inputs = _inputs(op, (2, kb.rows(17, 8), 65), dtype, kb.device, eps=0.1)
    _check(op, kb.name, inputs, f"{op} {kb.name} 3-D eps=0.1")


def test_layer_norm_constant_rows_with_zero_eps_match_reference(kb):
    # var = 0 and eps = 0: 0 * inf -> NaN, exactly like the reference and torch
    x = torch.ones(2, 8, device=kb.device)
    y = lmfast.ops.layer_norm(x, eps=0.0, backend=kb.name)
    assert torch.isnan(y).all()
    assert torch.isnan(torch.nn.functional.layer_norm(x, (8,), eps=0.0)).all()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("N", [1, 2, 9, 300])
def test_a_nan_makes_its_whole_row_nan(op, N, kb):
    """Found by the long fuzz profile (Triton RMSNorm): the variance clamp tl.maximum(var, 0)
    dropped a NaN (its default, like max.f32 and fmax), so a row holding one NaN came out NaN
    at that element only, the rest scaled by 1/sqrt(eps). The reference's row is all NaN."""
    x = torch.randn(3, N, device=kb.device)
    x[1, N // 2] = float("nan")
    y = getattr(lmfast.ops, op)(x, eps=1e-5, backend=kb.name)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()


def test_residual_output_is_exact_sum(kb, dtype):
    x = torch.randn(3, 50, dtype=dtype, device=kb.device)
    r = torch.randn(3, 50, dtype=dtype, device=kb.device)
    for fn in (lmfast.ops.layer_norm, lmfast.ops.rms_norm):
        _, s = fn(x, residual=r, backend=kb.name)
        assert torch.equal(s, x + r)  # one rounding, as eager


@pytest.mark.parametrize("op", OPS)
def test_rows_with_large_mean(op, kb):
    # |mean| >> std: normalizing must subtract the mean before scaling (x * rstd - mean * rstd
    # loses the cancellation, an error of ~eps * |mean| / std).
    inputs = _inputs(op, (kb.rows(33), 257), torch.float32, kb.device)
    inputs["x"] = inputs["x"] * 0.01 + 300.0
    inputs["residual"] = None
    _check(op, kb.name, inputs, f"{op} {kb.name} mean 300, std 0.02")


@pytest.mark.parametrize("op,width", [("layer_norm", 2), ("layer_norm", 3), ("layer_norm", 8),
                                      ("rms_norm", 1), ("rms_norm", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_short_rows_input_gradient_is_correctly_rounded(op, width, dtype, kb):
    """Found by the long fuzz profile: on rows of a few elements the input gradient is mostly or
    all cancellation (LayerNorm at N = 2, RMSNorm at N = 1: dx ~ eps / (var + eps) out of O(|dy|)
    terms), so the float32 roundings of rstd and xhat came out amplified ~var / eps times: 2-3x
    eager's error on single rows. Rows of <= 8 elements now form dx in float64 from the input
    and eps: every element is the float64 result rounded once (1 ulp allows for the Triton
    kernel's eps, passed as float32)."""
    fn, ref, _ = OPS[op]
    g = torch.Generator().manual_seed(width)
    rows = kb.rows(256, 32)
    x, dy, resid_grad = (torch.randn(rows, width, generator=g) * s for s in (2.0, 1.0, 1.0))
    w = torch.randn(width, generator=g)
    kwargs = {"weight": w.to(kb.device, dtype)} | ({"bias": w.flip(0).to(kb.device, dtype)} if op == "layer_norm" else {})
    for eps in (1e-5, 1e-6):
        xs = x.to(kb.device, dtype).requires_grad_()
        # residual = x: the sum s = 2x is exact, so the float64 reference sees the same s
        y, s = fn(xs, residual=xs.detach().clone(), eps=eps, backend=kb.name, **kwargs)
        (dx,) = torch.autograd.grad((y, s), xs, (dy.to(y), resid_grad.to(s)))
        s64 = (2 * xs.detach().double()).requires_grad_()  # d(loss)/dx = d(loss)/ds
        y64 = ref(s64, **{k: v.double() for k, v in kwargs.items()}, eps=eps)
        (dx64,) = torch.autograd.grad(y64, s64, dy.to(y).double())
        dx64 = dx64 + resid_grad.to(s).double()
        ulp = torch.finfo(dtype).eps  # (2^-23 for float32: one ulp at 1.0)
        bound = ulp * dx64.abs() + torch.finfo(dtype).tiny
        err = (dx.double() - dx64).abs()
        worst = (err / bound).max().item()
        assert worst <= 1.0, (f"{op} N={width} eps={eps} {kb.name} {dtype}: dx error up to {worst:.2f} ulp "
                              f"(at {tuple(int(i) for i in torch.unravel_index((err / bound).argmax(), err.shape))})")
