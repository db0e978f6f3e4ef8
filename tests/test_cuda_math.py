"""The CUDA kernels' per-thread arithmetic (csrc/cuda/row_math.h), built for the host: the
compensated sum (LayerNorm's mean), the online softmax state (softmax's long rows) and the split
attention combine (the decode kernel), each run as the kernels chunk and merge it, against
float64 (the mean within an ulp; the rest under the error-budget rule: at most twice the error
of float32 eager)."""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmfast.testing import assert_within_budget

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "row_math_host.cpp"
# Threads a row is split over, as the kernels split it: a warp, a block of 256, a block of 1024.
CHUNKS = [32, 256, 1024]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler: the host build of the CUDA row math needs one (as the C++ kernels do)")
    so = tmp_path_factory.mktemp("row_math") / "row_math.so"
    subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", str(SOURCE), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    f32p, i64 = ctypes.POINTER(ctypes.c_float), ctypes.c_int64
    lib.lmfast_compensated_mean.argtypes = [f32p, i64, i64]
    lib.lmfast_compensated_mean.restype = ctypes.c_float
    lib.lmfast_rowmax_lse.argtypes = [f32p, i64, i64]
    lib.lmfast_rowmax_lse.restype = ctypes.c_float
    lib.lmfast_split_attention.argtypes = [f32p, f32p, i64, i64, i64, f32p]
    lib.lmfast_split_attention.restype = ctypes.c_float
    return lib


def _ptr(t: torch.Tensor):
    assert t.dtype == torch.float32 and t.is_contiguous()
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("n", [1, 7, 1000, 4097, 65537])  # the last: LayerNorm's looped rows (> 32768)
def test_compensated_mean_is_rounded_once(lib, n, chunks):
    """LayerNorm's mean: within half an ulp of the float64 mean (rounded once, as torch's CPU
    mean, accumulated in double, is), large offsets too. A plain float tree sum of 3 +- 0.01
    values is off by several ulps, and the normalized output by rstd ~ 100 times that."""
    gen = torch.Generator().manual_seed(n)
    rows = [torch.randn(n, generator=gen) * s + m
            for s, m in ((1.0, 0.0), (1e-2, 3.0), (1e-2, 1e4), (50.0, -3.0)) for _ in range(4)]
    got = torch.tensor([lib.lmfast_compensated_mean(_ptr(x), x.numel(), chunks) for x in rows], dtype=torch.float64)
    ref = torch.stack([x.double().mean() for x in rows])
    # a float32 ulp at |ref|: 2^(exponent - 23)
    ulp = torch.finfo(torch.float32).eps * torch.exp2(torch.floor(torch.log2(ref.abs())))
    assert ((got - ref).abs() <= 0.501 * ulp).all(), f"errors in float32 ulps: {((got - ref).abs() / ulp).tolist()}"


def _lse(lib, x: torch.Tensor, chunks: int) -> float:
    return lib.lmfast_rowmax_lse(_ptr(x), x.numel(), chunks)


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("n", [1, 7, 1000, 4097])
def test_online_softmax_merge_matches_logsumexp(lib, n, chunks):
    rows = []
    for i in range(18):
        x = torch.randn(n) * (1 + 10 * (i % 3))
        if i % 2:  # masked entries
            x[torch.rand(n) < 0.5] = -math.inf
            x[0] = 0.5  # at least one kept
        rows.append(x)
    got = torch.tensor([_lse(lib, x, chunks) for x in rows])
    ref = torch.stack([torch.logsumexp(x.double(), 0) for x in rows])
    eager = torch.stack([torch.logsumexp(x, 0) for x in rows])
    assert_within_budget(got, ref, eager, f"lse (n={n}, chunks={chunks})")


@pytest.mark.parametrize("chunks", CHUNKS)
def test_fully_masked_row_has_lse_minus_inf(lib, chunks):
    x = torch.full((37,), -math.inf)
    assert _lse(lib, x, chunks) == -math.inf
    x[20] = 3.0  # one key: lse is its score, exactly
    assert _lse(lib, x, chunks) == 3.0


def _attend(lib, s: torch.Tensor, v: torch.Tensor, splits: int):
    o = torch.empty(v.shape[1])
    lse = lib.lmfast_split_attention(_ptr(s), _ptr(v.contiguous()), v.shape[0], v.shape[1], splits, _ptr(o))
    return o, lse


@pytest.mark.parametrize("splits", [1, 3, 16, 300])  # split sizes as the decode kernel's (>= 64 keys) and smaller
@pytest.mark.parametrize("n", [1, 50, 1000])
def test_split_attention_combine_matches_softmax(lib, n, splits):
    outs, lses, refs, eagers, ref_lse, eager_lse = [], [], [], [], [], []
    for i in range(16):
        s = torch.randn(n) * (1 + 4 * (i % 4))
        if i % 2:
            s[torch.rand(n) < 0.7] = -math.inf
            s[-1] = 0.0
        v = torch.randn(n, 24)
        o, lse = _attend(lib, s, v, splits)
        outs.append(o)
        lses.append(lse)
        refs.append(torch.softmax(s.double(), 0) @ v.double())
        eagers.append(torch.softmax(s, 0) @ v)
        ref_lse.append(torch.logsumexp(s.double(), 0))
        eager_lse.append(torch.logsumexp(s, 0))
    assert_within_budget(torch.stack(outs), torch.stack(refs), torch.stack(eagers), f"o (n={n}, splits={splits})")
    assert_within_budget(torch.tensor(lses), torch.stack(ref_lse), torch.stack(eager_lse), "lse")


@pytest.mark.parametrize("splits", [1, 4])
def test_split_attention_fully_masked_gives_zeros(lib, splits):
    o, lse = _attend(lib, torch.full((9,), -math.inf), torch.randn(9, 5), splits)
    assert lse == -math.inf and torch.equal(o, torch.zeros(5))


@pytest.mark.parametrize("chunks", CHUNKS)
def test_nan_propagates_through_the_merges(lib, chunks):
    # (found by tests/test_fuzz.py on the CPU kernel: a max that drops NaN, as fmaxf and
    # std::max(-inf, NaN) do, turns a NaN row into a "fully masked" one of zeros)
    x = torch.randn(300)
    x[123] = math.nan
    assert math.isnan(_lse(lib, x, chunks))
    s, v = torch.randn(300), torch.randn(300, 4)
    s[7] = math.nan
    o, lse = _attend(lib, s, v, min(chunks, 300))
    assert math.isnan(lse) and torch.isnan(o).all()
