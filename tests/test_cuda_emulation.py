"""The CUDA C++ kernels (csrc/cuda) on this machine's CPU: the host emulator
(csrc/cuda/emulation) runs the unchanged kernel sources, each CUDA thread a fiber switched at
its barriers, and their outputs and gradients are checked against the float64 reference under
the error-budget rule, as every backend's are.

What this proves: the kernels' indexing, tiling, masking, reductions, split-K combine and
barrier placement, on every launch path (warp and block rows, cached and looped rows, 128-bit
and scalar accesses, prefill and decode, float32 and tensor-core tiles), and that no launch
diverges at a barrier, shuffles with an exited lane or makes a misaligned vector access. What it
cannot: speed, the hardware's memory model beyond barrier order, the tensor cores' rounding,
compiler bugs. Those wait for a GPU (scripts/gpu_check.sh).

The emulated library builds once per source hash into build/cuda-emulation-<hash> (~15 s;
tests/cuda_emulation.py).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest
import torch

from lmfast import reference
from lmfast.testing import (assert_document_bands, assert_document_runs, check_against_reference, cu_seqlens,
                            random_document_lengths)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emu(cuda_emulation):
    return cuda_emulation.build()


@pytest.fixture(params=["forward", "reverse"])
def thread_order(request, monkeypatch):
    """Fibers run in thread order or in reverse: a missing barrier reads stale shared memory in one."""
    monkeypatch.setenv("LMFAST_CUDA_EMULATION_ORDER", request.param)
    return request.param


# ---- the emulator itself: it must reject what a GPU would, and expose a missing barrier --------

@pytest.mark.parametrize("case,message", [
    ("divergent_barriers", "the block cannot go on.*waits at __syncthreads.*waits at a warp barrier"),
    ("exit_before_syncthreads", "has exited"),
    ("shuffle_with_exited_lanes", "warp barrier with an exited lane"),
    ("misaligned_load", "misaligned 16-byte access"),
    ("shared_past_48k_without_opt_in", "past the kernel's limit"),
])
def test_the_emulator_rejects_what_a_gpu_would(emu, case, message):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(case)


def test_the_emulator_exposes_a_missing_barrier(emu, thread_order):
    """Thread t reads what thread t + 1 wrote to shared memory: with __syncthreads between, every
    read sees the write; without, some thread reads unwritten shared memory (NaN) in either order."""
    n = 64
    assert torch.equal(emu.selftest("barrier"), (torch.arange(n) + 1).remainder(n).float())
    assert emu.selftest("missing_barrier").isnan().any()


def test_the_emulator_ors_block_votes(emu, thread_order):
    """__syncthreads_or in nine rounds, one thread or none voting true: every thread sees each
    round's answer (6 true of 9), in either thread order."""
    assert torch.equal(emu.selftest("vote"), torch.full((64,), 6.0))


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- norms ---------------------------------------------------------------------------------

class _Norm(torch.autograd.Function):
    """The emulated {layer,rms}_norm_{fwd,bwd} with the autograd of lmfast/ops/norm.py's Triton path."""

    @staticmethod
    def forward(ctx, ops, centered, x, weight, bias, residual, eps, weight_offset=0.0):
        if centered:
            y, s, mean, rstd = ops.layer_norm_fwd(x, weight, bias, residual, eps)
        else:
            (y, s, rstd), mean = ops.rms_norm_fwd(x, weight, residual, eps, weight_offset), None
        ctx.ops, ctx.centered, ctx.eps, ctx.has_residual = ops, centered, eps, residual is not None
        ctx.weight_offset = weight_offset
        ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
        if residual is None:
            ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        normed, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[2:6]
        ds = ds.contiguous() if ctx.has_residual else None
        if ctx.centered:
            dx, dw, db = ctx.ops.layer_norm_bwd(dy.contiguous(), normed, weight, mean, rstd, ds, need_w, need_b,
                                                ctx.eps)
        else:
            (dx, dw), db = ctx.ops.rms_norm_bwd(dy.contiguous(), normed, weight, rstd, ds, need_w, ctx.eps,
                                                ctx.weight_offset), None
        return (None, None, dx if need_x else None, dw if need_w else None, db if need_b else None,
                dx if need_r else None, None, None)


# (rows, N): exact-row backward (N <= 8); a warp per row with scalar and 128-bit accesses; the
# backward's block rows (N > 512); block rows held in registers; long rows looped over.
NORM_SHAPES = [(40, 1), (40, 5), (40, 33), (200, 64), (24, 520), (8, 1000), (6, 1500), (3, 4100), (2, 40000)]


@pytest.mark.parametrize("centered,weight_offset", [(True, 0.0), (False, 0.0), (False, 1.0)],
                         ids=["layer_norm", "rms_norm", "rms_norm-weight_offset1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,N", NORM_SHAPES, ids=lambda v: str(v))
def test_norms(emu, centered, weight_offset, dtype, rows, N):
    # some shapes without weight and bias (weight_offset needs a weight: Gemma's weights, around 0)
    affine = N % 2 == 1 or N >= 1000 or weight_offset != 0
    residual = N in (5, 64, 1500, 40000)

    def fn(x, weight=None, bias=None, residual=None):
        y, s = _Norm.apply(emu, centered, x, weight, bias, residual, 1e-5, weight_offset)
        return y if residual is None else (y, s)

    def ref(x, weight=None, bias=None, residual=None):
        if centered:
            return reference.layer_norm(x, weight, bias, 1e-5, residual)
        return reference.rms_norm(x, weight, 1e-5, residual, weight_offset)

    inputs = {"x": _randn(rows, N, dtype=dtype) * 2 + 0.5}
    if affine:
        inputs["weight"] = _randn(N, dtype=dtype, seed=1) * (0.1 if weight_offset else 1.0)
        if centered:
            inputs["bias"] = _randn(N, dtype=dtype, seed=2)
    if residual:
        inputs["residual"] = _randn(rows, N, dtype=dtype, seed=3)
    check_against_reference(fn, ref, inputs, grad=list(inputs), name=f"cuda-emulated {'layer' if centered else 'rms'}"
                            f"_norm {rows}x{N} {dtype}")


@pytest.mark.parametrize("N", [1000, 3000, 30000, 42963],
                         ids=["warp-rows", "block-rows", "block-rows-in-many-registers", "looped-rows"])
def test_layer_norm_of_rows_far_from_zero(emu, N):
    """Values 3 +- 0.01: the output is (s - mean) * rstd with rstd ~ 100, so an ulp of error in
    the mean is 100x that in y. A float tree sum (and before it, Welford's running mean on long
    rows) was several ulps off the mean: up to 4x over budget. The mean is a compensated sum."""
    for seed in range(3):
        x = _randn(2, N, dtype=torch.float32, seed=seed) * 0.01 + 3
        check_against_reference(lambda x: _Norm.apply(emu, True, x, None, None, None, 1e-5)[0],
                                lambda x: reference.layer_norm(x, None, None, 1e-5), {"x": x},
                                name=f"rows far from zero, N={N}, seed {seed}")


def test_norm_weight_gradient_of_many_narrow_rows(emu):
    """Rows of <= 8 elements take the exact-row backward: a thread per row, its dweight sums in
    double. Summing the threads' partials in float32 (1024 of them here) cost several ulps
    where eager's tree sum costs about one: over budget. The sum is in double now."""
    for centered in (True, False):
        def fn(x, weight):
            return _Norm.apply(emu, centered, x, weight, None, None, 1e-5)[0]

        def ref(x, weight):
            return reference.layer_norm(x, weight, None, 1e-5) if centered else reference.rms_norm(x, weight, 1e-5)

        draws = iter(range(100))

        def inputs():
            seed = next(draws)
            return {"x": _randn(3000, 3, dtype=torch.float32, seed=seed) * 10 + 3,
                    "weight": _randn(3, dtype=torch.float32, seed=seed + 50)}

        check_against_reference(fn, ref, inputs, grad=["weight"], trials=6, name=f"narrow rows centered={centered}")


# ---- softmax -------------------------------------------------------------------------------

class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, x, mask, scale, causal):
        y = ops.softmax_fwd(x, None if mask is None else mask.expand(x.shape), scale, causal)
        ctx.ops, ctx.scale = ops, scale
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return None, ctx.ops.softmax_bwd(dy.contiguous(), y, ctx.scale), None, None, None


# (B, H, M, N), mask: None, a boolean (1, 1, M, N) or (B, 1, 1, N) one, an additive one;
# causal with M > N leaves rows that see no key at all (zeros).
SOFTMAX_CASES = [
    ((2, 3, 5, 7), None, False), ((2, 3, 5, 7), "bool-keys", True), ((2, 2, 9, 4), None, True),
    ((1, 2, 8, 64), "additive", False), ((2, 1, 4, 64), "bool", True), ((1, 2, 3, 1000), "additive", True),
    ((1, 1, 3, 1500), "bool-keys", False), ((1, 1, 2, 4100), None, True), ((1, 1, 2, 40000), "additive", False),
]


def _softmax_mask(kind, shape, dtype):
    B, _, M, N = shape
    gen = torch.Generator().manual_seed(7)
    if kind == "bool":
        keep = torch.rand(1, 1, M, N, generator=gen) > 0.3
        keep[..., 0, :] = False  # a fully masked row
        return keep
    if kind == "bool-keys":
        return torch.rand(B, 1, 1, N, generator=gen) > 0.5
    if kind == "additive":
        return (torch.randn(1, 1, M, N, generator=gen) * 2).to(dtype)
    return None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,mask_kind,causal", SOFTMAX_CASES, ids=lambda v: str(v))
def test_softmax(emu, dtype, shape, mask_kind, causal):
    mask = _softmax_mask(mask_kind, shape, dtype)

    def fn(x, mask=None):
        return _Softmax.apply(emu, x, mask, 0.7, causal)

    def ref(x, mask=None):
        return reference.softmax(x, -1, 0.7, mask, causal)

    inputs = {"x": _randn(*shape, dtype=dtype) * 3}
    if mask is not None:
        inputs["mask"] = mask
    check_against_reference(fn, ref, inputs, grad=["x"], name=f"cuda-emulated softmax {shape} {mask_kind} "
                            f"causal={causal} {dtype}")


# ---- attention (forward: the backward on CUDA is Triton's) -------------------------------------

# (B, Hq, Hkv, Sq, Sk, D): Sq <= 4 takes the decode kernel (split-K + combine), more the prefill
# kernel; head dims padded to 32, 64, 128 and 256, some not a multiple of 8 (scalar tile loads).
# Sk = 77 and 33 leave a decode warp's last keys to only some of its lane groups (the shuffle
# must still see every lane: a divergent one fails there, not with 300 keys in 5 splits of 60).
ATTENTION_SHAPES = [
    (1, 2, 2, 1, 300, 64), (2, 4, 2, 3, 77, 40), (1, 2, 1, 4, 520, 128), (1, 1, 1, 2, 33, 3),
    (1, 2, 2, 37, 45, 64), (2, 2, 1, 70, 70, 32), (1, 2, 2, 20, 150, 72), (1, 1, 1, 40, 33, 200),
]


def _reference_forward(q, k, v, attn_mask=None, dropout_p=0.0, dropout_seed=None, **kw):
    """The kernel forward's three outputs from the reference: (o, lse, row stats), the row stats
    undropped as lse is (csrc/ops.h)."""
    o, lse = reference.attention(q, k, v, attn_mask, dropout_p=dropout_p, dropout_seed=dropout_seed, **kw)
    return o, lse, reference.attention_row_stats(q, k, v, attn_mask, **kw)


def _attention_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, mask_kind, strided):
    if strided:  # (B, S, H, D) memory, as a model's projections leave it
        q = _randn(B, Sq, Hq, D, dtype=dtype).transpose(1, 2)
        k = _randn(B, Sk, Hkv, D, dtype=dtype, seed=1).transpose(1, 2)
        v = _randn(B, Sk, Hkv, D, dtype=dtype, seed=2).transpose(1, 2)
    else:
        q = _randn(B, Hq, Sq, D, dtype=dtype)
        k = _randn(B, Hkv, Sk, D, dtype=dtype, seed=1)
        v = _randn(B, Hkv, Sk, D, dtype=dtype, seed=2)
    inputs = {"q": q * 1.5, "k": k, "v": v}
    gen = torch.Generator().manual_seed(5)
    if mask_kind == "bool":
        keep = torch.rand(B, 1, Sq, Sk, generator=gen) > 0.2
        keep[:, :, 0, :] = False  # a fully masked row: o = 0, lse = -inf
        inputs["attn_mask"] = keep
    elif mask_kind == "additive":
        inputs["attn_mask"] = (torch.randn(1, Hq, Sq, Sk, generator=gen) * 2).to(dtype)
    return inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("variant", ["plain", "causal", "window-bool", "additive-strided"])
def test_attention(emu, dtype, shape, variant):
    B, Hq, Hkv, Sq, Sk, D = shape
    causal = variant in ("causal", "window-bool")
    window = 9 if variant == "window-bool" else None
    mask_kind = {"window-bool": "bool", "additive-strided": "additive"}.get(variant)
    inputs = _attention_inputs(*shape, dtype, mask_kind, strided=variant == "additive-strided")
    scale = D ** -0.5

    def fn(q, k, v, attn_mask=None):
        mask = None if attn_mask is None else attn_mask.expand(B, Hq, Sq, Sk)
        return tuple(emu.attention_fwd(q, k, v, mask, scale, causal, window, 0.0, None))

    def ref(q, k, v, attn_mask=None):
        return _reference_forward(q, k, v, attn_mask, causal=causal, scale=scale, window=window)

    check_against_reference(fn, ref, inputs, name=f"cuda-emulated attention {shape} {variant} {dtype}")


# (B, Hq, Hkv, Sq, Sk, D, Dv): v's head dim other than q's (DeepSeek's multi-head latent
# attention), both ways, on the decode and prefill kernels; Dv = 20 in 16-bit dtypes leaves the
# 16-byte loads off (40 bytes a row)
VALUE_HEAD_SHAPES = [(2, 4, 2, 3, 300, 48, 32), (1, 2, 1, 2, 77, 16, 40), (1, 4, 2, 37, 90, 24, 40),
                     (1, 2, 2, 40, 33, 40, 20)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", VALUE_HEAD_SHAPES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("extras", ["plain", "dropout-softcap"])
def test_attention_value_head_dim_other_than_the_querys(emu, dtype, shape, extras):
    B, Hq, Hkv, Sq, Sk, D, Dv = shape
    inputs = _attention_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, "bool", strided=False)
    inputs["v"] = _randn(B, Hkv, Sk, Dv, dtype=dtype, seed=2)
    scale = D ** -0.5
    p, seed, cap = (0.4, 2**40 + 3, 2.5) if extras == "dropout-softcap" else (0.0, None, 0.0)

    def fn(q, k, v, attn_mask):
        return tuple(emu.attention_fwd(q, k, v, attn_mask.expand(B, Hq, Sq, Sk), scale, True, None, p,
                                       None if seed is None else torch.tensor([seed]), cap))

    def ref(q, k, v, attn_mask):
        return _reference_forward(q, k, v, attn_mask, causal=True, scale=scale, dropout_p=p, dropout_seed=seed,
                                  softcap=cap or None)

    o = fn(**inputs)[0]
    assert o.shape == (B, Hq, Sq, Dv) and o.transpose(1, 2).is_contiguous()
    check_against_reference(fn, ref, inputs, name=f"cuda-emulated attention {shape} {extras} {dtype}")


# Packed documents as cu_seqlens (query lengths, key lengths, causal, window): on the prefill
# kernel (documents starting inside and across its query blocks and key tiles, one empty,
# rows that see nothing) and the decode kernel (one query row per document).
CU_SEQLENS_CASES = {
    "prefill causal": ([37, 0, 1, 60, 22], [37, 0, 1, 60, 22], True, None),
    "prefill bidirectional": ([37, 0, 1, 60, 22], [37, 0, 1, 60, 22], False, None),
    "prefill window, queries past the keys": ([30, 12, 40], [45, 4, 40], True, 9),
    "decode": ([1, 1, 1], [300, 0, 250], True, None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CU_SEQLENS_CASES)
def test_attention_cu_seqlens(emu, dtype, case):
    """cu_seqlens: each row's band read from the table csrc/documents.h builds, in place of the
    causal/window arithmetic, wherever the kernels ask for a row's keys."""
    lens_q, lens_k, causal, window = CU_SEQLENS_CASES[case]
    cq, ck = (cu_seqlens(n, dtype=torch.int64) for n in (lens_q, lens_k))
    inputs = _attention_inputs(1, 4, 2, sum(lens_q), sum(lens_k), 40, dtype, None, strided=True)

    def fn(q, k, v):
        return tuple(emu.attention_fwd(q, k, v, None, 0.2, causal, window, 0.0, None, 0.0, cq, ck))

    def ref(q, k, v):
        return _reference_forward(q, k, v, None, causal=causal, scale=0.2, window=window, cu_seqlens_q=cq,
                                  cu_seqlens_k=ck)

    check_against_reference(fn, ref, inputs, name=f"cuda-emulated attention cu_seqlens {case} {dtype}")


def test_document_bands_kernel(emu, thread_order):
    """The CUDA kernels' table of packed documents, built on the device (attention.cu:
    document_bands, a thread a row): each row's [lo, hi) exactly the keys the reference lets
    it see, and the check entry 1; int32 and int64 boundaries, strided, windows (one past Sk).
    Bad boundaries (falling past the first block's 256 threads too, wrong ends) give 0 and
    bands inside [0, Sk]."""
    gen = torch.Generator().manual_seed(5)
    for trial in range(24):
        lens_q, lens_k = random_document_lengths(gen, [1, 2, 3, 9, 40][trial % 5])
        causal, window = trial % 3 != 0, [None, 1, 2, 7, 10**6][trial % 5]
        cq, ck = (cu_seqlens(n, dtype=torch.int64) for n in (lens_q, lens_k))
        cq = cq.to(torch.int32) if trial % 2 else cq
        if trial % 3 == 1:  # boundaries every other element of a longer tensor
            ck = torch.stack([ck, ck], 1)[:, 0]
        Sq, Sk = sum(lens_q), sum(lens_k)
        table = emu.document_bands(cq, ck, Sq, Sk, causal, window)
        what = f"documents {lens_q} / {lens_k}, causal={causal}, window={window}"
        assert table.shape == (2 * Sq + len(lens_q) + 2,) and table[-1] == 1, what
        assert_document_bands(reference.documents_keep(cq, ck, causal, window), table[:Sq], table[Sq:2 * Sq],
                              what=what)
        assert table[2 * Sq:-1].tolist() == cq.tolist(), what  # (the prefill blocks' runs of one document)
    good = torch.arange(601)  # 600 one-row documents
    for cq, ck, Sq, Sk in ((good, good.flip(0), 600, 600),                  # keys fall everywhere, from 600 to 0
                           (good, torch.cat([good[:400], good[400:] - 2]), 600, 598),  # one fall, at 400
                           (torch.cat([good[:300], good[300:] - 2]), good, 598, 600),  # the queries', at 300
                           (good, good, 600, 599),                         # ends past Sk
                           (good.to(torch.int32) - 1, good, 599, 600)):     # starts at -1
        table = emu.document_bands(cq, ck, Sq, Sk, True, 3)
        rows, boundaries = table[:2 * Sq], table[2 * Sq:-1]
        assert table[-1] == 0, (Sq, Sk)
        assert bool(((rows >= 0) & (rows <= Sk)).all() and (rows[Sq:] >= rows[:Sq]).all())
        assert bool(((boundaries >= 0) & (boundaries <= Sq)).all())


def test_document_runs(emu):
    """The prefill kernel's blocks under packed documents (documents::document_run): Sq / BLOCK_M
    + n runs cover every row once, none mixes documents or crosses a block of BLOCK_M rows, none
    splits a document's stretch of a block. (The Triton kernels' mapping is the same, tested in
    test_attention_kernels.py.)"""
    gen = torch.Generator().manual_seed(7)
    for trial in range(24):
        lens, _ = random_document_lengths(gen, [1, 2, 3, 9, 40, 100][trial % 6])
        block = [1, 4, 16, 64][trial % 4]
        runs = emu.document_runs(cu_seqlens(lens), block).tolist()
        assert_document_runs([tuple(run) for run in runs], lens, block)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_attention_packed_documents(emu, dtype, causal, thread_order):
    """The prefill kernel skips the key tiles a boolean mask drops whole (a block-wide vote):
    documents of 40, 70 and 40 tokens side by side leave some query blocks' tiles dropped, some
    kept, some partly kept."""
    B, Hq, Hkv, S, D = 1, 2, 1, 150, 64
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 70, 40]))
    keep = (doc[:, None] == doc[None, :])[None, None]
    if causal:
        keep = keep & torch.ones(S, S, dtype=torch.bool).tril()
    inputs = {**_attention_inputs(B, Hq, Hkv, S, S, D, dtype, None, strided=False), "attn_mask": keep}

    def fn(q, k, v, attn_mask):
        return tuple(emu.attention_fwd(q, k, v, attn_mask.expand(B, Hq, S, S), D ** -0.5, causal, None, 0.0, None))

    def ref(q, k, v, attn_mask):
        return _reference_forward(q, k, v, attn_mask, causal=causal)

    check_against_reference(fn, ref, inputs, name=f"cuda-emulated attention, packed documents {causal=} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 2, 37, 90, 64), (2, 4, 2, 3, 300, 32)], ids=["prefill", "decode"])
def test_attention_dropout(emu, dtype, shape):
    """Dropout in both kernels: the entries reference.dropout_keep drops (seed past 32 bits) weigh
    0, the rest 1 / (1 - p); lse undropped."""
    B, Hq, Hkv, Sq, Sk, D = shape
    inputs = _attention_inputs(*shape, dtype, "bool", strided=False)
    p, seed = 0.4, 2**40 + 3

    def fn(q, k, v, attn_mask):
        return tuple(emu.attention_fwd(q, k, v, attn_mask.expand(B, Hq, Sq, Sk), D ** -0.5, True, None, p,
                                       torch.tensor([seed])))

    def ref(q, k, v, attn_mask):
        return _reference_forward(q, k, v, attn_mask, causal=True, dropout_p=p, dropout_seed=seed)

    check_against_reference(fn, ref, inputs, name=f"cuda-emulated attention dropout {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 2, 37, 90, 64), (2, 4, 2, 3, 300, 32)], ids=["prefill", "decode"])
def test_attention_softcap(emu, dtype, shape):
    """Logit softcapping (Gemma 2) in both kernels: c tanh(s / c) before an additive mask; q scaled
    up so that scores reach a few caps."""
    B, Hq, Hkv, Sq, Sk, D = shape
    inputs = _attention_inputs(*shape, dtype, "additive", strided=False)
    inputs["q"] = inputs["q"] * 2

    def fn(q, k, v, attn_mask):
        return tuple(emu.attention_fwd(q, k, v, attn_mask.expand(B, Hq, Sq, Sk), D ** -0.5, True, None, 0.0, None,
                                       2.5))

    def ref(q, k, v, attn_mask):
        return _reference_forward(q, k, v, attn_mask, causal=True, softcap=2.5)

    check_against_reference(fn, ref, inputs, name=f"cuda-emulated attention softcap {shape} {dtype}")


def test_attention_rows_that_see_no_key(emu):
    """Causal with Sq > Sk: the first Sq - Sk rows see no key (o = 0, lse = -inf, row stats 0), in
    both kernels."""
    for Sq in (3, 40):
        q, k, v = (_randn(1, 2, S, 64, dtype=torch.float16, seed=i) for i, S in enumerate((Sq, 2, 2)))
        o, lse, stats = emu.attention_fwd(q, k, v, None, 0.125, True, None, 0.0, None)
        o_ref, lse_ref = reference.attention(q.double(), k.double(), v.double(), causal=True, scale=0.125)
        torch.testing.assert_close(o.double(), o_ref, atol=2e-3, rtol=2e-3)
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and torch.isinf(lse[..., :Sq - 2]).all()
        assert torch.equal(stats[..., :Sq - 2], torch.zeros(2, 1, 2, Sq - 2)) and (stats[1, ..., Sq - 2:] > 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_reads_no_key_a_boolean_mask_hides(emu, dtype):
    """The decode kernel skips the loads of every key a boolean mask hides (a batch's left
    padding: 100 of 300 keys here, and scattered keys): NaN planted in k and v there stays out
    of o and lse, which are those of the same inputs with the hidden keys zeroed."""
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 1, 300, 64
    inputs = _attention_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, None, strided=False)
    keep = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    keep[0, ..., :100] = False  # left padding of batch row 0
    keep[1, ..., 7::13] = False
    hidden = ~keep[:, 0, 0]  # (B, Sk)
    q, k, v = inputs["q"], inputs["k"].clone(), inputs["v"].clone()
    zeroed_k, zeroed_v = k.clone(), v.clone()
    for t, z in ((k, zeroed_k), (v, zeroed_v)):
        t.masked_fill_(hidden[:, None, :, None], float("nan"))
        z.masked_fill_(hidden[:, None, :, None], 0.0)
    mask4 = keep.expand(B, Hq, Sq, Sk)
    o, lse, stats = emu.attention_fwd(q, k, v, mask4, D ** -0.5, False, None, 0.0, None)
    o_want, lse_want, stats_want = emu.attention_fwd(q, zeroed_k, zeroed_v, mask4, D ** -0.5, False, None, 0.0, None)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert torch.equal(o, o_want) and torch.equal(lse, lse_want) and torch.equal(stats, stats_want)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="with a GPU, test_attention_kernels runs this composition on it (backend 'cuda')")
@pytest.mark.parametrize("shape", [(2, 4, 2, 2, 1000), (1, 4, 2, 37, 90)], ids=["decode", "prefill"])
def test_backward_from_the_cuda_forwards_row_stats(emu, shape):
    """Backend "cuda"'s gradients as a GPU computes them: the emulated CUDA forward's row stats
    feed the Triton backward (through its interpreter), p = exp(s - m) / l. The decoding shape in
    float32 is the one where FlashAttention-2's exp(s - lse) put dv past the budget
    (test_attention_kernels.test_float32_backward_on_decoding_shapes)."""
    from lmfast import kernels

    B, Hq, Hkv, Sq, Sk = shape
    scale = 0.125

    class CudaForwardTritonBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            o, lse, row_stats = emu.attention_fwd(q, k, v, None, scale, True, None, 0.0, None)
            ctx.save_for_backward(q, k, v, o, row_stats)
            return o, lse

        @staticmethod
        def backward(ctx, do, dlse):
            q, k, v, o, row_stats = ctx.saved_tensors
            dq, dk, dv, _ = kernels.attention_bwd(do.contiguous(), q, k, v, o.contiguous(), row_stats,
                                                  None if dlse is None else dlse.contiguous(), None, scale, True,
                                                  None, False)
            return dq, dk, dv

    for seed in range(2):
        inputs = {name: _randn(*dims, 64, dtype=torch.float32, seed=10 * seed + i)
                  for i, (name, dims) in enumerate((("q", (B, Hq, Sq)), ("k", (B, Hkv, Sk)), ("v", (B, Hkv, Sk))))}
        check_against_reference(lambda q, k, v: CudaForwardTritonBackward.apply(q, k, v),
                                lambda q, k, v: reference.attention(q, k, v, causal=True, scale=scale), inputs,
                                grad=("q", "k", "v"), name=f"cuda forward + triton backward {shape} seed {seed}")


# ---- the thread order: both orders on a path with shared memory per kernel -------------------

def test_both_thread_orders(emu, thread_order):
    """One case per kernel that shares data through shared memory or shuffles, in both orders."""
    test_norms(emu, True, 0.0, torch.float32, 3, 4100)
    test_norms(emu, False, 1.0, torch.bfloat16, 200, 64)
    test_softmax(emu, torch.float16, (1, 1, 3, 1500), "bool-keys", False)
    test_attention(emu, torch.bfloat16, (1, 2, 2, 37, 45, 64), "causal")
    test_attention(emu, torch.float32, (2, 2, 1, 70, 70, 32), "plain")
    test_attention(emu, torch.float16, (1, 2, 2, 1, 300, 64), "plain")


# ---- the fuzz, through the public C++ ops ----------------------------------------------------

def test_fuzz_through_the_public_ops(cuda_emulation):
    """tests/test_fuzz.py's CPU-backend fuzz (shapes from 0 up, strided views, broadcast masks,
    fully masked rows, NaN/inf propagation, extreme magnitudes, gradients), in a process where the
    emulated CUDA kernels stand behind lmfast_C's kernel ops (conftest.py,
    LMFAST_TEST_CPU_KERNELS=cuda-emulation): api.cpp's checks, autograd and glue around the CUDA
    kernels, as backend "cuda" runs them on a GPU. With an H100's 132 SMs, where the tests above
    see 3: the launchers size grids from it (more norm-backward groups than rows, more splits)."""
    cuda_emulation.build()  # (built here, not in the child, so a build error reads as one)
    env = {**os.environ, "LMFAST_TEST_CPU_KERNELS": "cuda-emulation", "LMFAST_CUDA_EMULATION_SMS": "132"}
    fuzz = Path(__file__).with_name("test_fuzz.py")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          str(fuzz), "-k", "cpu-cpu"], env=env, capture_output=True, text=True, timeout=1200,
                         cwd=tempfile.gettempdir())  # (not the checkout's lmfast, which `python -m` would import)
    assert run.returncode == 0, f"fuzz with the emulated CUDA kernels failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert "4 passed" in run.stdout, run.stdout[-2000:]
