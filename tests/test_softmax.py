"""softmax(scale * x + mask), causal: every kernel backend against the float64 reference under
the error budget, forward and gradients (of x, and of an additive mask that requires grad)."""

import pytest
import torch

import lmfast
from lmfast import reference
from lmfast.testing import check_against_reference

WIDTHS = [1, 7, 127, 1000, 4097, 16384]


def _check(kb, name, x, *, dim=-1, scale=1.0, mask=None, causal=False, mask_grad=False):
    inputs = {"x": x, "dim": dim, "scale": scale, "mask": mask, "causal": causal}
    grad = ["x", "mask"] if mask_grad else ["x"]
    check_against_reference(lambda **kw: lmfast.ops.softmax(**kw, backend=kb.name),
                            reference.softmax, inputs, grad=grad, name=f"softmax {kb.name} {name}")


def _randn(*shape, kb, dtype=torch.float32):
    return torch.randn(shape, device=kb.device, dtype=dtype) * 3


@pytest.mark.parametrize("width", WIDTHS)
def test_all_widths_with_scale(width, kb, dtype):
    _check(kb, f"w={width}", _randn(kb.rows(33), width, kb=kb, dtype=dtype), scale=0.125)


@pytest.mark.parametrize("width", WIDTHS)
def test_all_widths_causal_and_mask(width, kb, dtype):
    x = _randn(1, 2, kb.rows(19, 8), width, kb=kb, dtype=dtype)
    pad = torch.rand(1, 1, 1, width, device=kb.device) > 0.2  # key padding, broadcast over heads/queries
    _check(kb, f"w={width} causal+mask", x, scale=0.3, mask=pad, causal=True)


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (17, 17), (5, 33), (1, 100), (33, 5)],
                         ids=["1x1", "square", "q<k", "decode", "q>k"])
def test_causal_is_bottom_right_aligned(q_len, k_len, kb, dtype):
    # q > k: the first q - k queries see no key at all and give zeros.
    x = _randn(4, 4 * 17 // q_len + 1, q_len, k_len, kb=kb, dtype=dtype)  # >= 16 rows
    _check(kb, f"causal {q_len}x{k_len}", x, scale=0.5, causal=True)


def test_causal_q_longer_than_k_gives_zero_rows(kb):
    y = lmfast.ops.softmax(torch.randn(1, 1, 6, 4, device=kb.device), causal=True, backend=kb.name)
    assert torch.count_nonzero(y[..., :2, :]) == 0
    assert torch.allclose(y[..., 2:, :].sum(-1).cpu(), torch.ones(4))


MASKS = {
    # name: (mask shape for x of shape (B=2, H=3, M=5, N=37), dtype kind)
    "additive-full": ((2, 3, 5, 37), "float"),
    "additive-per-query": ((5, 37), "float"),
    "additive-per-batch-key": ((2, 1, 1, 37), "float"),
    "additive-per-row-scalar": ((2, 3, 5, 1), "float"),  # zero stride along the softmax dim
    "bool-key-padding": ((2, 1, 1, 37), "bool"),
    "bool-full": ((2, 3, 5, 37), "bool"),
    "bool-per-row": ((2, 3, 5, 1), "bool"),
}


def _mask(shape, kind, kb, dtype):
    if kind == "bool":
        return torch.rand(shape, device=kb.device) > 0.3
    m = torch.randn(shape, device=kb.device, dtype=dtype)
    return m.masked_fill(torch.rand(shape, device=kb.device) < 0.2, float("-inf"))


@pytest.mark.parametrize("mask_name", MASKS)
def test_mask_kinds(mask_name, kb, dtype):
    shape, kind = MASKS[mask_name]
    _check(kb, mask_name, _randn(2, 3, 5, 37, kb=kb, dtype=dtype), scale=0.7, mask=_mask(shape, kind, kb, dtype))


@pytest.mark.parametrize("mask_name", ["additive-full", "additive-per-query", "additive-per-batch-key"])
def test_additive_mask_gradient(mask_name, kb, dtype):
    shape, _ = MASKS[mask_name]
    mask = torch.randn(shape, device=kb.device, dtype=dtype)  # finite: a learnable bias
    _check(kb, f"{mask_name} grad", _randn(2, 3, 5, 37, kb=kb, dtype=dtype), scale=0.7, mask=mask,
           causal=True, mask_grad=True)


@pytest.mark.parametrize("shape", [(1,), (2, 1, 5, 1), (1, 3, 1, 1)], ids=["scalar", "per-query", "per-head"])
def test_mask_constant_along_the_softmax_dim_has_zero_gradient(shape, kb, dtype):
    """Softmax ignores a constant added to a row, so such a mask's gradient is exactly 0; a
    float sum of the row's gradient leaves its rounding noise (1e-7 in bfloat16, where the
    float64 reference has 1e-28 and eager, on near one-hot rows, the same: found by the long
    fuzz profile). NaN stays NaN."""
    x = _randn(2, 3, 5, 37, kb=kb, dtype=dtype) * 1e3  # near one-hot rows, as the fuzzer drew
    x[0, 0, 0, 0] = float("nan")
    mask = torch.randn(shape, device=kb.device, dtype=dtype).requires_grad_()
    y = lmfast.ops.softmax(x, scale=0.7, mask=mask, backend=kb.name)
    (dmask,) = torch.autograd.grad(y, mask, torch.randn_like(y))
    expected = torch.zeros_like(mask)
    expected[(0,) * len(shape)] = float("nan")  # the NaN row's mask entry (a scalar mask's only one)
    torch.testing.assert_close(dmask, expected, rtol=0, atol=0, equal_nan=True)
    clean = torch.nan_to_num(x, nan=0.0)  # and without NaN: zeros everywhere
    (dmask,) = torch.autograd.grad(lmfast.ops.softmax(clean, scale=0.7, mask=mask, backend=kb.name), mask,
                                   torch.randn_like(y))
    assert (dmask == 0).all(), dmask


def test_fully_masked_rows_are_zero_with_zero_grad(kb, dtype):
    x = _randn(2, 9, 9, kb=kb, dtype=dtype)
    keep = torch.rand(2, 9, 9, device=kb.device) > 0.5
    keep[0, 1] = False  # one row with nothing kept
    neg = torch.zeros(2, 9, 9, device=kb.device, dtype=dtype)
    neg[1, 2] = float("-inf")  # one additive row all -inf
    for mask in (keep, neg):
        xr = x.detach().requires_grad_()
        y = lmfast.ops.softmax(xr, mask=mask, backend=kb.name)
        assert not torch.isnan(y).any()
        (g,) = torch.autograd.grad(y, xr, torch.randn_like(y))
        assert not torch.isnan(g).any()
        dead = ~(mask if mask.dtype == torch.bool else mask > float("-inf")).any(-1)
        assert dead.any()
        assert torch.count_nonzero(y[dead]) == 0 and torch.count_nonzero(g[dead]) == 0
        _check(kb, "fully masked rows", x, mask=mask)


def test_transposed_mask_and_non_contiguous_x(kb):
    x = _randn(3, 40, 6, kb=kb).transpose(1, 2)  # (3, 6, 40), not contiguous
    mask = torch.randn(40, 6, device=kb.device).t()  # (6, 40) with last stride 6
    assert not x.is_contiguous() and mask.stride(-1) != 1
    _check(kb, "transposed mask", x, mask=mask, scale=0.9)


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_other_dims(dim, kb, dtype):
    x = _randn(5, 6, 7, kb=kb, dtype=dtype)
    mask = _mask((1, 6, 7), "float", kb, dtype)
    _check(kb, f"dim={dim}", x, dim=dim, scale=1.5, mask=mask)


@pytest.mark.parametrize("shape", [(1000,), (16, 37), (2, 2, 2, 3, 37), (2, 3, 3, 1, 2, 37)])
def test_ranks(shape, kb):
    # A rank-1 softmax is one row: its gradient is one random draw, so it is long (see
    # lmfast.testing) to keep the error statistic meaningful.
    x = _randn(*shape, kb=kb)
    mask = torch.rand(shape[-1], device=kb.device) > 0.3
    _check(kb, f"rank {len(shape)}", x, mask=mask, causal=len(shape) >= 2)


def test_rank_above_4_with_unmergeable_mask(kb):
    x = _randn(2, 3, 4, 5, 6, kb=kb)
    mask = torch.randn(3, 1, 5, 6, device=kb.device)  # broadcast in a middle dim
    _check(kb, "rank 5 unmergeable mask", x, mask=mask)


def test_rows_too_long_for_registers(kb, dtype):
    # 40000 > 32 elements x 1024 threads: the CUDA forward's online (max, sum) pass
    x = _randn(1, 2, 8, 40000, kb=kb, dtype=dtype)
    pad = torch.rand(1, 1, 1, 40000, device=kb.device) > 0.3
    _check(kb, "w=40000 causal+mask", x, scale=0.2, mask=pad, causal=True)


def test_wide_rows_loop_over_blocks(kb, dtype, small_triton_blocks):
    x = _randn(1, 2, kb.rows(9, 8), 1000, kb=kb, dtype=dtype)
    pad = torch.rand(1, 1, 1, 1000, device=kb.device) > 0.3
    _check(kb, "looping causal+mask", x, scale=0.2, mask=pad, causal=True)
    _check(kb, "looping plain", x[0])


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 0, 8)], ids=["no-rows", "width-0", "no-rows-3d"])
def test_empty(shape, kb):
    x = torch.randn(shape, device=kb.device, requires_grad=True)
    y = lmfast.ops.softmax(x, causal=True, backend=kb.name)
    assert y.shape == x.shape
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert g.shape == x.shape


def test_gradcheck_cpu_float64():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(3, 1, 6, dtype=torch.float64, requires_grad=True)

    def f(x, mask):
        return lmfast.ops.softmax(x, scale=0.7, mask=mask, causal=True, backend="cpu")

    assert torch.autograd.gradcheck(f, (x, mask))


def test_float64_on_cpu_backend():
    x = torch.randn(2, 3, 50, 70, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 1, 70) > 0.2
    got = lmfast.ops.softmax(x, scale=0.4, mask=mask, causal=True, backend="cpu")
    want = reference.softmax(x, -1, 0.4, mask, True)
    torch.testing.assert_close(got, want)
    dy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, dy), torch.autograd.grad(want, x, dy))


@pytest.mark.parametrize("dtype16", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_mask_broadcast_along_the_softmax_dim(kb, dtype16):
    # Found by tests/test_fuzz.py: an additive mask constant along the softmax dim (here: one
    # value per column, softmax over the rows) has gradient 0 (a row's d(logits) sums to 0);
    # summed after rounding each element to 16 bits it came out 3e-4 instead of eager's 1e-7.
    x = _randn(2, 16, kb=kb, dtype=dtype16)
    mask = torch.randn(16, device=kb.device).to(dtype16)
    _check(kb, "mask broadcast along dim 0", x, dim=0, mask=mask, mask_grad=True)
    x4 = _randn(2, 3, 5, 8, kb=kb, dtype=dtype16)
    _check(kb, "mask broadcast along the last dim", x4, mask=torch.randn(2, 3, 5, 1, device=kb.device).to(dtype16),
           mask_grad=True)


def test_nan_under_a_boolean_mask_does_not_reach_the_row(kb, dtype):
    # Found by tests/test_fuzz.py: the CPU kernel added -inf for masked-out entries, so a NaN
    # there (padding positions hold anything) made NaN + -inf = NaN and poisoned the row; a
    # boolean mask selects, as masked_fill does.
    x = _randn(2, 3, 16, 40, kb=kb, dtype=dtype)
    keep = torch.rand(1, 1, 16, 40, device=kb.device) > 0.3
    keep[..., 0, :] = False  # and one fully masked row: zeros
    x = x.masked_fill(~keep, float("nan"))
    _check(kb, "nan where masked", x, mask=keep)


@pytest.mark.parametrize("dtype16", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("width", [2, 5, 64])
def test_16bit_peaked_rows_gradient(width, kb, dtype16):
    """Found by the long fuzz profile: on a peaked row (y_max ~ 0.998) the gradient of the
    dominant entry is dy_k (1 - y_k) - ..., and 1 - y_k read from y rounded to 16 bits (an ulp
    of 1 is 2^-8 in bfloat16) made it 7 ulps off where eager, whose autograd keeps a float32 y,
    was 0.3 off. The backward now renormalizes the 16-bit y (dx = y (dy sum(y) - y.dy) / sum(y)^2)."""
    g = torch.Generator().manual_seed(width)
    x = torch.rand(kb.rows(256, 64), width, generator=g) * 2e4 - 1e4  # logit gaps of hundreds
    x[:, 0] = x.max(dim=1).values - 30 - torch.rand(x.shape[0], generator=g) * 40  # y_0 ~ e^-4 .. e^-9
    # (the float16 case fails with the former formula: 5-25x eager's error)
    _check(kb, f"peaked w={width}", x.to(kb.device, dtype16), scale=0.125)


def test_bfloat16_denormal_probabilities_are_rounded_not_flushed():
    """Four equal maxima and the rest at -87: those entries' probabilities, exp(-87) / 4 ~ 4e-39,
    are bfloat16 denormals. The C++ kernels' AVX512-BF16 conversion (csrc/cpu/vec.h, from_float)
    flushes a denormal to zero, so a chunk holding one must take the rounding conversion: the
    output is the reference's, rounded once, and nothing is flushed. (That path runs where the
    avx512bf16 kernels load, on CPUs with AVX512-BF16; elsewhere this checks the plain rounding.)"""
    x = torch.full((3, 100), -87.0)
    x[:, :4] = 0.0
    x[1, 50:] = -86.0  # (and denormals of another size in a second row)
    x = x.to(torch.bfloat16)
    got = lmfast.ops.softmax(x, dim=-1, backend="cpu")
    want = torch.softmax(x.double(), dim=-1).to(torch.bfloat16)
    assert (want[:, 4:] != 0).all() and (want[:, 4:].float().abs() < torch.finfo(torch.float32).tiny).all()
    assert torch.equal(got, want)


def test_empty_x_with_a_mask_over_another_dim(kb):
    """Found by the long fuzz profile: softmax over dim 2 of a (0, 0, 2, 2) x with a (2, 2)
    boolean mask raised "mask's last stride must be 0 or 1" (the C++ op checked the strides of
    the moved, expanded mask before noticing there was nothing to compute)."""
    x = torch.randn(0, 0, 2, 2, device=kb.device, requires_grad=True)
    mask = torch.rand(2, 2, device=kb.device) > 0.5
    y = lmfast.ops.softmax(x, dim=2, mask=mask, backend=kb.name)
    assert y.shape == x.shape
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.shape == x.shape
