"""The error-budget rule itself (lmfast/testing.py): what passes and what fails, so that a change
to the rule that every kernel test leans on is seen here first."""

import pytest
import torch

from lmfast.testing import assert_within_budget

F16_MAX = 65504.0


def _f16(*values):
    return torch.tensor(values, dtype=torch.float16)


def _f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_correctly_rounded_passes_and_a_wrong_element_fails():
    ref = torch.randn(64, dtype=torch.float64)
    eager = ref.float()
    assert_within_budget(ref.float(), ref, eager)
    wrong = ref.float().clone()
    wrong[7] += 1e-3
    with pytest.raises(AssertionError, match="RMS error"):
        assert_within_budget(wrong, ref, eager)


def test_a_reference_beyond_the_range_must_overflow():
    # float64 68424 is +inf in float16; 65504 there is wrong
    ref = _f64(1.0, 68424.0, -1e6)
    assert_within_budget(_f16(1.0, float("inf"), float("-inf")), ref, _f16(1.0, float("inf"), float("-inf")))
    with pytest.raises(AssertionError, match=r"\+inf placement"):
        assert_within_budget(_f16(1.0, F16_MAX, float("-inf")), ref, _f16(1.0, float("inf"), float("-inf")))
    with pytest.raises(AssertionError, match=r"\+inf placement .* index \(2,\)"):  # the wrong sign
        assert_within_budget(_f16(1.0, float("inf"), float("inf")), ref, _f16(1.0, float("inf"), float("-inf")))


def test_between_the_largest_value_and_the_next_power_of_two_either_side_is_right():
    # 65520.49 rounds to +inf, but float32 accumulation may well land on 65519: both pass
    ref = _f64(1.0, 65520.49)
    for got in (_f16(1.0, F16_MAX), _f16(1.0, float("inf"))):
        assert_within_budget(got, ref, _f16(1.0, F16_MAX))
    with pytest.raises(AssertionError, match=r"-inf placement"):  # but not the other sign
        assert_within_budget(_f16(1.0, float("-inf")), ref, _f16(1.0, F16_MAX))
    with pytest.raises(AssertionError, match=r"\+inf placement"):  # nor below the largest value
        assert_within_budget(_f16(float("inf"), F16_MAX), ref, _f16(1.0, F16_MAX))


def test_near_the_overflow_point_either_side_is_right():
    # -65501.8 rounds to -65504 in float16, but a result an ulp off rounds past -65520, where
    # rounding overflows, to -inf: right (a float16 dq whose upstream gradient was rounded to
    # float16, as eager's also was). Two ulps further from it (-65440), -inf is wrong, however
    # eager does.
    ref = torch.randn(64, dtype=torch.float64) * 100
    ref[5] = -65501.83
    got = ref.half()
    got[5] = float("-inf")
    assert_within_budget(got, ref, ref.half())
    with pytest.raises(AssertionError, match=r"\+inf placement"):  # never the other sign
        assert_within_budget(-got, ref, ref.half())
    ref[5] = -65440.0
    for eager in (ref.half(), got):
        with pytest.raises(AssertionError, match=r"-inf placement"):
            assert_within_budget(got, ref, eager)
    # and from above: -65547.5 is -inf in float16, and -65504 is an ulp off: right; -65600 is
    # further (80 past -65520, more than an ulp): -65504 is wrong there where eager is exact,
    # right where eager lands on -65504 too (its error, 96, then allows 192)
    got[5] = -F16_MAX
    ref[5] = -65547.5
    assert_within_budget(got, ref, ref.half())
    ref[5] = -65600.0
    with pytest.raises(AssertionError, match=r"-inf placement"):
        assert_within_budget(got, ref, ref.half())
    assert_within_budget(got, ref, torch.where(torch.arange(64) == 5, -F16_MAX, ref).half())


def test_nan_placement():
    ref = _f64(1.0, float("nan"))
    assert_within_budget(_f16(1.0, float("nan")), ref, _f16(1.0, float("nan")))
    with pytest.raises(AssertionError, match="NaN placement"):
        assert_within_budget(_f16(1.0, 0.0), ref, _f16(1.0, float("nan")))
    with pytest.raises(AssertionError, match="NaN placement"):
        assert_within_budget(_f16(float("nan"), float("nan")), ref, _f16(1.0, float("nan")))


def test_eager_overflowing_does_not_make_the_budget_infinite():
    # eager overflowed an intermediate at one entry; the budget comes from the others, and a
    # kernel far off elsewhere still fails
    ref = torch.randn(64, dtype=torch.float64)
    eager = ref.float().clone()
    eager[0] = float("inf")
    assert_within_budget(ref.float(), ref, eager)
    wrong = ref.float() * 1.01
    with pytest.raises(AssertionError, match="RMS error"):
        assert_within_budget(wrong, ref, eager)
