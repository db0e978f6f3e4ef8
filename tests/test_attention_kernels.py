"""Attention kernels (every backend that implements attention) against the float64
reference under the error budget: outputs, lse, and the gradients of q, k, v, an additive
mask and lse; head dims 16-256, odd lengths, grouped-query ratios, every mask kind, bottom-right
causal, windows, fully masked rows; plus peak memory (no (Sq, Sk) buffer) and torch.compile."""

import math
import os
import subprocess
import sys
import tempfile
import types

import pytest
import torch

import lmfast
from lmfast import reference
from lmfast._backends import KERNEL_OPS
from lmfast.testing import (assert_document_bands, assert_document_runs, check_against_reference, cu_seqlens,
                            dispatched_ops, random_document_lengths)


@pytest.fixture
def ab(kb):
    """The kernel backend under test, if it implements attention."""
    if "attention" not in KERNEL_OPS[kb.name]:
        pytest.skip(f"backend {kb.name!r} has no attention kernel yet (issue 3 in progress)")
    return kb


def _inputs(ab, B, Hq, Hkv, Sq, Sk, D, dtype, *, mask=None, causal=False, window=None, scale=None, Dv=None):
    def rand(*shape):
        return torch.randn(shape, device=ab.device).to(dtype)
    return {"q": rand(B, Hq, Sq, D), "k": rand(B, Hkv, Sk, D), "v": rand(B, Hkv, Sk, D if Dv is None else Dv),
            "attn_mask": mask, "causal": causal, "scale": scale, "window": window}


def _check(ab, name, inputs, grad=("q", "k", "v"), trials=1):
    check_against_reference(lambda **kw: lmfast.ops.attention(**kw, return_lse=True, backend=ab.name),
                            reference.attention, inputs, grad=grad, name=f"attention {ab.name} {name}",
                            trials=trials)


@pytest.mark.parametrize("D", [16, 64, 80, 96, 128, 256])
def test_head_dims(D, ab, dtype):
    _check(ab, f"D={D}", _inputs(ab, 2, 4, 2, 17, 33, D, dtype, causal=True))


# (D, Dv): DeepSeek's multi-head latent attention (q and k heads of 192 = 128 + 64 rotary, v heads
# of 128), a smaller one, a value head wider than the query's, and an odd one
@pytest.mark.parametrize("D,Dv", [(192, 128), (24, 16), (16, 40), (24, 15)], ids=lambda d: str(d))
@pytest.mark.parametrize("Sq,Sk,mask", [(37, 90, "bool"), (3, 600, None), (70, 70, "additive")],
                         ids=["prefill-bool", "decode", "square-additive"])
def test_value_head_dim_other_than_the_querys(D, Dv, Sq, Sk, mask, ab, dtype):
    """o is (B, Hq, Sq, Dv); values, lse and every gradient within budget, GQA and causal. The
    decode shape takes the key-split paths (the CPU's, and Triton's split kernel and combine);
    the square one the CPU's long-query forward (2 x 70 rows a kv head), on brgemm in bfloat16
    where the CPU has it, as its backward (but Dv = 15: brgemm's packing pairs dims, so an odd
    head dim takes the widening path, both directions)."""
    B, Hq, Hkv = 2, 4, 2
    attn_mask = (None if mask is None else torch.rand(B, 1, Sq, Sk, device=ab.device) > 0.2 if mask == "bool"
                 else torch.randn(1, Hq, Sq, Sk, device=ab.device).to(dtype))
    ins = _inputs(ab, B, Hq, Hkv, Sq, Sk, D, dtype, mask=attn_mask, causal=True, Dv=Dv)
    # (_check asserts lmfast's output has the reference's shape: one kernel run, not two, in the interpreter)
    assert reference.attention(**ins)[0].shape == (B, Hq, Sq, Dv)
    _check(ab, f"D={D} Dv={Dv} Sq={Sq} Sk={Sk} mask={mask}", ins,
           grad=("q", "k", "v") if mask != "additive" else ("q", "k", "v", "attn_mask"))


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 1000), (17, 17), (127, 127), (17, 1000), (1000, 1000)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths(Sq, Sk, causal, ab):
    B, Hq = (2, 8) if Sq == 1 else (1, 2)  # >= 16 query rows for the lse statistic
    _check(ab, f"Sq={Sq} Sk={Sk} causal={causal}", _inputs(ab, B, Hq, 2, Sq, Sk, 64, torch.float32, causal=causal))


LONG_QUERY_MASKS = {
    None: None,
    "bool-padding": lambda B, Sq, Sk: (torch.arange(Sk) < Sk - 40).expand(B, 1, Sq, Sk),
    "additive": lambda B, Sq, Sk: torch.randn(B, 1, Sq, Sk),
}


@pytest.mark.parametrize("mask_name", LONG_QUERY_MASKS)
@pytest.mark.parametrize("band", ["full", "causal", "window"])
@pytest.mark.parametrize("D", [64, 80, 33])
def test_cpu_bfloat16_long_queries(D, band, mask_name):
    """The C++ kernel's long-query forward in bfloat16: on a CPU with AMX-BF16 or AVX512-BF16
    its tile products run on oneDNN's brgemm from K/V packed once per head (256 x 256 tiles, so
    300 queries and 517 keys leave partial tiles on both sides, odd in the keys); an odd head
    dim (33) takes the widening path everywhere. (Where neither unit is present, this is the
    widening path too; test_cpu_bfloat16_widening_path runs it where they are.)"""
    cpu = types.SimpleNamespace(name="cpu", device="cpu")
    B, Sq, Sk = 1, 300, 517
    make = LONG_QUERY_MASKS[mask_name]
    mask = None if make is None else make(B, Sq, Sk)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(torch.bfloat16)
    _check(cpu, f"bf16 long queries D={D} {band} {mask_name}",
           _inputs(cpu, B, 4, 2, Sq, Sk, D, torch.bfloat16, mask=mask, causal=band == "causal",
                   window=100 if band == "window" else None))


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def test_cpu_bfloat16_tiles_run_on_the_cpus_bfloat16_unit(tmp_path):
    """bfloat16 attention uses brgemm wherever the CPU multiplies bfloat16 natively (AMX-BF16, or
    AVX512-BF16 as on AMD Zen 4/5), so a lost fast path fails here instead of only slowing down;
    LMFAST_CPU_BRGEMM=0 turns it off."""
    from lmfast import _extension

    flags = _cpu_flags() if os.path.exists("/proc/cpuinfo") else set()
    expected = "amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags else "sgemm"
    if os.environ.get("LMFAST_CPU_BRGEMM") == "0":
        expected = "sgemm"
    assert _extension.bf16_attention_unit() == expected, f"CPU flags: {sorted(flags)}"
    off = subprocess.run([sys.executable, "-c", "from lmfast import _extension; print(_extension.bf16_attention_unit())"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,  # (not the checkout's lmfast)
                         env={**os.environ, "LMFAST_CPU_BRGEMM": "0"})
    assert off.stdout.strip() == "sgemm", off.stdout + off.stderr


def test_cpu_bfloat16_widening_path(tests_in_fresh_process):
    """Where bfloat16 tiles run on brgemm, the widening path (LMFAST_CPU_BRGEMM=0: float32 tiles for
    sgemm) still passes the bfloat16 attention parity tests, in a fresh process."""
    from lmfast import _extension

    if _extension.bf16_attention_unit() == "sgemm":
        pytest.skip("this CPU has no AMX-BF16 or AVX512-BF16: every bfloat16 test here runs the widening path")
    tests_in_fresh_process([__file__], "cpu and not triton and (bf16 or bfloat16) and not widening and not unit",
                           LMFAST_CPU_BRGEMM="0")


DECODE_MASKS = {
    None: None,
    # the first 70% of the keys are padding: whole key ranges of the CPU kernel's splits see nothing
    "bool-left-padding": lambda B, Sk: (torch.arange(Sk) >= 0.7 * Sk).expand(B, 1, 1, Sk),
    "additive-full": lambda B, Sk: torch.randn(B, 1, 1, Sk),
}


@pytest.mark.parametrize("mask_name", DECODE_MASKS)
@pytest.mark.parametrize("B,Hq,Hkv,Sq", [(1, 16, 1, 1), (1, 9, 3, 2), (2, 1, 1, 8)], ids=["mqa", "gqa3", "mha-8rows"])
def test_cpu_decoding_splits_a_long_cache(B, Hq, Hkv, Sq, mask_name, dtype):
    """The C++ kernel's decode path: a few query rows per kv head (16 rows: a BLAS tile; 6 or 8:
    the hand-written one) against 1000 cached keys, and few kv heads, so that it reads each kv
    head once for its whole query group and splits the keys over tasks (4 threads: 7, 3 and 4
    splits), merging their partial softmaxes; causal, windowed, masked, fully padded ranges.
    (test_decoding_with_a_long_cache below runs the Triton kernels' split path.)"""
    cpu = types.SimpleNamespace(name="cpu", device="cpu")
    Sk, make = 1000, DECODE_MASKS[mask_name]
    mask = None if make is None else make(B, Sk)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the split count follows the thread count
    try:
        for window in (None, 300):
            _check(cpu, f"decode B={B} {Hq}/{Hkv} Sq={Sq} {mask_name} window={window}",
                   _inputs(cpu, B, Hq, Hkv, Sq, Sk, 64, dtype, mask=mask, causal=True, window=window))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("Sq", [1, 2])
def test_cpu_backward_of_a_groups_few_rows_together(Sq, mask_kind, dtype):
    """The C++ bfloat16 backward on brgemm (where the CPU has it) takes a query block of few
    rows for its kv head's whole group at once (one set of products over the keys, padded to 16
    rows, not one a head): here 4 heads x 1 or 2 rows. Each row keeps its own head's mask, lse
    gradient, dropout keep and dq: masks per head, one head's rows seeing no key, a window, and
    the additive mask's gradient; then dropout. (float32 and float16 run a head an item: the
    same cases, the old way.)"""
    cpu = types.SimpleNamespace(name="cpu", device="cpu")
    B, Hq, Hkv, Sk = 2, 8, 2, 45  # group 4
    if mask_kind == "bool":
        mask = torch.rand(B, Hq, Sq, Sk) > 0.3
        mask[1, 5] = False  # head 5 of batch 1 sees nothing: zeros, beside heads that see keys
    else:
        mask = torch.randn(B, Hq, Sq, Sk).to(dtype)
    ins = _inputs(cpu, B, Hq, Hkv, Sq, Sk, 64, dtype, mask=mask, causal=True, window=30)
    _check(cpu, f"{Hq}/{Hkv} heads x {Sq} rows, {mask_kind} mask per head", ins,
           grad=("q", "k", "v") + (("attn_mask",) if mask_kind == "additive" else ()))
    ins.update(dropout_p=0.3, dropout_seed=torch.tensor([5]))
    check_against_reference(lambda **kw: lmfast.ops.attention(**kw, return_lse=True, backend="cpu"),
                            _reference_with_seed, ins, grad=("q", "k", "v"),
                            name=f"attention cpu {Hq}/{Hkv} heads x {Sq} rows, {mask_kind} mask, dropout")


@pytest.mark.parametrize("case", ["sequences in disjoint chunks", "draft rows in overlapping chunks"])
def test_cpu_backward_of_few_row_items_in_chunks(case, dtype):
    """The C++ backward cuts a kv head's work items into chunks, each summing its rows' dk, dv
    over the keys they see. Where every item has few rows (decoding) the float kernel sums them
    as rows; where no two chunks share a key (packed sequences, cut at a sequence's start) each
    chunk writes its own keys, and zeros for the keys before them that no row sees. Here 40
    one-token sequences over 1-20 cached keys, with caches no query reads first, in the middle
    and last (5 disjoint chunks a kv head); and 4 draft rows of 8 heads on one kv head (2
    chunks over the same keys, added up)."""
    cpu = types.SimpleNamespace(name="cpu", device="cpu")
    if case == "sequences in disjoint chunks":
        lens_q = [0] + [1] * 20 + [0] + [1] * 19 + [0]
        lens_k = torch.randint(1, 21, (len(lens_q),), generator=torch.Generator().manual_seed(3)).tolist()
        ins = _inputs(cpu, 1, 4, 2, sum(lens_q), sum(lens_k), 32, dtype, causal=True)
        ins.update(cu_seqlens_q=cu_seqlens(lens_q, "cpu"), cu_seqlens_k=cu_seqlens(lens_k, "cpu"))
    else:
        ins = _inputs(cpu, 1, 8, 1, 4, 300, 64, dtype, causal=True)
    _check(cpu, case, ins)


@pytest.mark.parametrize("ratio", [1, 3, 8])
def test_grouped_query_ratios(ratio, ab, dtype):
    _check(ab, f"GQA {ratio}", _inputs(ab, 2, 2 * ratio, 2, 19, 40, 32, dtype, causal=True))


MASKS = {
    "bool-key-padding": lambda B, H, Sq, Sk: torch.rand(B, 1, 1, Sk) > 0.3,
    "bool-full": lambda B, H, Sq, Sk: torch.rand(B, H, Sq, Sk) > 0.3,
    "additive-full": lambda B, H, Sq, Sk: torch.randn(B, H, Sq, Sk),
    "additive-per-query": lambda B, H, Sq, Sk: torch.randn(Sq, Sk).masked_fill(torch.rand(Sq, Sk) < 0.2, float("-inf")),
}


@pytest.mark.parametrize("mask_name", MASKS)
def test_masks(mask_name, ab, dtype):
    m = MASKS[mask_name](2, 4, 21, 300).to(ab.device)
    if m.dtype != torch.bool:
        m = m.to(dtype)
    _check(ab, mask_name, _inputs(ab, 2, 4, 2, 21, 300, 64, dtype, mask=m, causal=True))


def _packed_documents(lengths, causal):
    """The (1, 1, S, S) boolean mask of documents packed in one sequence: each query sees the
    keys of its own document (with causal, the ones up to itself)."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    keep = doc[:, None] == doc[None, :]
    if causal:
        keep &= torch.ones_like(keep).tril()
    return keep[None, None]


# Boolean masks that drop whole key tiles for whole query blocks (the kernels skip those tiles'
# work): (B, Hq, Hkv, Sq, Sk, mask, causal), by the tile sizes of the backend. Documents of
# 256 + 200 + 150 tokens leave the C++ kernels' tiles (128 or 256 queries x 128 or 256 keys)
# dropped, kept and partly kept, in the forward and the backward; 64 + 50 + 40 do the same to the
# interpreted Triton kernels' 64 x 64 tiles (Triton on a GPU: the long documents). The decoding
# case's padded stretch spans whole splits and tiles of every backend's decode path.
def _block_sparse_cases(interpreted: bool):
    docs = [64, 50, 40] if interpreted else [256, 200, 150]
    S, Sk = sum(docs), 600 if interpreted else 1000
    padded = (torch.arange(Sk) < 100) | (torch.arange(Sk) >= Sk - 100)
    return {
        "packed documents, causal": (1, 2, 1, S, S, lambda: _packed_documents(docs, True), False),
        "packed documents, causal flag too": (1, 2, 1, S, S, lambda: _packed_documents(docs, True), True),
        "packed documents, bidirectional": (1, 2, 1, S, S, lambda: _packed_documents(docs, False), False),
        "decoding, padded stretch": (2, 4, 2, 2, Sk, lambda: padded.expand(2, 1, 1, Sk), True),
    }


@pytest.mark.parametrize("case", _block_sparse_cases(False))
def test_block_sparse_boolean_masks(case, ab, dtype):
    interpreted = ab.name == "triton" and ab.device == "cpu"
    B, Hq, Hkv, Sq, Sk, make_mask, causal = _block_sparse_cases(interpreted)[case]
    D = 64 if case.startswith("decoding") else 32  # (32: a short test; 64: the data that found the next test's case)
    _check(ab, case, _inputs(ab, B, Hq, Hkv, Sq, Sk, D, dtype, mask=make_mask().to(ab.device), causal=causal))


@pytest.mark.parametrize("seed", range(4))
def test_float32_backward_on_decoding_shapes(seed, ab):
    """Found by the decoding case above: 2 query rows per kv head over 600-1000 keys put the
    Triton backward's dv and dk at up to 2.8x eager's RMS error in float32, past the budget for
    some seeds, from FlashAttention-2's p = exp(s - lse) (its rounding of s - lse, ~log(keys)
    from 0, is every p's relative error). It takes p = exp(s - m) / l now, from the forward's
    row stats (README: attention, backward precision; on backend "cuda", the CUDA C++ forward's
    stats). Each seed is held to the budget alone."""
    torch.manual_seed(seed)
    _check(ab, f"2 x 1000 keys, seed {seed}", _inputs(ab, 2, 4, 2, 2, 1000, 64, torch.float32, causal=True))


ROW_STATS_CASES = {  # (B, Hq, Hkv, Sq, Sk, mask, causal, window, softcap)
    # bottom-right causal, a random boolean mask and a row that sees no key (m = 0, 1 / l = 0)
    "prefill": (2, 4, 2, 37, 90, "bool", True, None, None),
    "decoding": (2, 8, 2, 1, 700, None, True, None, None),  # the split kernels and their combine
    "additive, window, softcap": (1, 4, 1, 20, 45, "additive", False, 9, 3.0),
}


@pytest.mark.parametrize("case", ROW_STATS_CASES)
def test_forward_returns_the_row_stats_the_backward_reads(case, ab, dtype):
    """The kernel forward's third output (csrc/ops.h): each row's max score m and 1 / l, l = sum
    of exp(s - m), which the Triton backward reads for p = exp(s - m) / l (on backend "cuda"
    from the CUDA C++ forward), against the float64 reference's, under the error budget."""
    B, Hq, Hkv, Sq, Sk, mask_kind, causal, window, softcap = ROW_STATS_CASES[case]
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, Sq, Sk, device=ab.device) > 0.3
        mask[0, :, 5] = False
    elif mask_kind == "additive":
        mask = torch.randn(1, Hq, Sq, Sk, device=ab.device).to(dtype)
    lmfast.backends()  # (loads the C++ library)
    ns = torch.ops.lmfast_triton if ab.name == "triton" else torch.ops.lmfast_C
    inputs = {**_inputs(ab, B, Hq, Hkv, Sq, Sk, 64, dtype, mask=mask, causal=causal, window=window, scale=0.125),
              "softcap": softcap}

    def kernel(q, k, v, attn_mask, causal, scale, window, softcap):
        mask4 = None if attn_mask is None else attn_mask.expand(B, Hq, Sq, Sk)
        return tuple(ns.attention_fwd(q, k, v, mask4, scale, causal, window, 0.0, None, softcap or 0.0))

    def ref(**kw):
        return (*reference.attention(**kw), reference.attention_row_stats(**kw))

    check_against_reference(kernel, ref, inputs, grad=(), name=f"attention {ab.name} row stats {case}")
    stats = kernel(**inputs)[2]
    if mask_kind == "bool":
        assert torch.equal(stats[:, 0, :, 5].cpu(), torch.zeros(2, Hq))  # the row that sees no key


def test_additive_mask_and_lse_gradients(ab, dtype):
    bias = torch.randn(1, 4, 19, 50, device=ab.device).to(dtype)  # e.g. a learned position bias
    _check(ab, "mask grad", _inputs(ab, 2, 4, 2, 19, 50, 32, dtype, mask=bias, causal=True),
           grad=("q", "k", "v", "attn_mask"))


def test_broadcast_mask_gradient_is_summed_before_rounding(ab):
    """A float16 mask broadcast over queries: its gradient sums each key's ds over the queries.
    Here every ds is +-120000, past float16's range, and they cancel to exactly 0: rounded per
    element first (as the kernels once returned dmask), the sum was inf - inf = NaN (found by the
    long fuzz profile, with dropout and large v); summed in float32 it is the exact 0."""
    Sq, D = 10, 8
    q = torch.zeros(1, 1, Sq, D, device=ab.device, dtype=torch.float16)  # p = 1/2 on both keys
    k = torch.randn(1, 1, 2, D, device=ab.device).half()
    v = torch.zeros(1, 1, 2, D, device=ab.device, dtype=torch.float16)
    v[0, 0, 1, 0] = 60000.0  # dp = do v^T: 0 for key 0, 60000 do[..., 0] for key 1
    do = torch.zeros(1, 1, Sq, D, device=ab.device, dtype=torch.float16)
    do[0, 0, :, 0] = torch.tensor([8.0, -8.0] * (Sq // 2))  # ds = -+(1/4) 60000 do: +-120000, alternating
    mask = torch.zeros(1, 1, 1, 2, device=ab.device, dtype=torch.float16, requires_grad=True)
    o = lmfast.ops.attention(q, k, v, attn_mask=mask, backend=ab.name)
    (dmask,) = torch.autograd.grad(o, mask, do)
    assert dmask.dtype == torch.float16 and torch.equal(dmask.cpu(), torch.zeros(1, 1, 1, 2, dtype=torch.float16)), dmask
    # and where the sum itself leaves float16's range it is inf, as the float64 reference rounds
    (dmask,) = torch.autograd.grad(lmfast.ops.attention(q, k, v, attn_mask=mask, backend=ab.name), mask, do.abs())
    assert dmask.cpu().tolist() == [[[[-math.inf, math.inf]]]], dmask


@pytest.mark.parametrize("window", [1, 7, 64])
@pytest.mark.parametrize("Sq,Sk", [(40, 40), (9, 70)])
def test_sliding_windows(window, Sq, Sk, ab):
    _check(ab, f"window={window} {Sq}x{Sk}", _inputs(ab, 2, 4, 1, Sq, Sk, 32, torch.float32, causal=True, window=window))
    _check(ab, f"window={window} {Sq}x{Sk} no causal", _inputs(ab, 2, 4, 1, Sq, Sk, 32, torch.float32, window=window))


def test_fully_masked_rows_give_zeros_not_nan(ab, dtype):
    pad = torch.ones(2, 1, 20, 30, dtype=torch.bool, device=ab.device)
    pad[0, :, 3] = False  # one query sees nothing
    ins = _inputs(ab, 2, 4, 2, 20, 30, 32, dtype, mask=pad)
    q, k, v = (ins[n].requires_grad_() for n in "qkv")
    o, lse = lmfast.ops.attention(q, k, v, pad, return_lse=True, backend=ab.name)
    assert torch.count_nonzero(o[0, :, 3]) == 0 and torch.isneginf(lse[0, :, 3]).all()
    grads = torch.autograd.grad(o.float().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    _check(ab, "fully masked rows", ins)
    # causal with Sq > Sk: the first Sq - Sk queries see no key
    _check(ab, "causal Sq > Sk", _inputs(ab, 2, 4, 2, 30, 12, 32, dtype, causal=True))


def _sinks_reference(sinks, dropout_seed=None, **kw):
    """The oracle (float64 inputs) and the unfused baseline of attention with sinks. The oracle,
    and the baseline of 16-bit inputs, append the sink as a key (lmfast.reference.attention).
    The float32 baseline composes the sinks from an unfused attention's (o, lse), as lmfast
    does: in float32 the sinks' gradient, through p_sink = exp(sink - lse'), then carries lse's
    rounding, about |lse'| ulps where the appended key's softmax has 1-2 (3-4x at 300 keys),
    whichever attention computed lse (README: attention sinks)."""
    if dropout_seed is not None:
        kw["dropout_seed"] = int(dropout_seed)
    if kw["q"].dtype != torch.float32:
        return reference.attention(**kw, sinks=sinks)
    from lmfast.ops.attention import _with_sinks

    return _with_sinks(*reference.attention(**kw), sinks, True)


SINK_CASES = {  # (B, Hq, Hkv, Sq, Sk, D, mask kind, causal, window, dropout_p); 16 heads: the sinks'
    # gradient has one value per head, and the error budget's RMS needs >= 16 of them
    "gqa, causal, key padding with a row that sees nothing": (1, 16, 2, 9, 33, 32, "bool", True, None, 0.0),
    "window, additive mask": (1, 16, 1, 24, 24, 16, "additive", True, 7, 0.0),
    "decoding, long cache": (2, 16, 4, 1, 700, 64, None, True, None, 0.0),
    "dropout": (1, 16, 2, 13, 45, 32, None, False, None, 0.3),
}


@pytest.mark.parametrize("case", SINK_CASES)
def test_attention_sinks(case, ab, dtype):
    """Attention sinks (gpt-oss): one more score per row, sinks[h], with no value. Outputs,
    lse (which counts the sink) and the gradients of q, k, v and the sinks against the float64
    reference, which appends the sink as a key column (lmfast.reference.attention); the op
    composes them from the kernel's (o, lse). A row that sees no key gives o = 0 and lse = its
    sink, with finite gradients; a sink of -inf is no sink."""
    B, Hq, Hkv, Sq, Sk, D, mask_kind, causal, window, dropout_p = SINK_CASES[case]
    if ab.slow:  # the Triton interpreter: shorter rows (the sinks are composed outside the kernels)
        Sq, Sk = (Sq + 1) // 2, (Sk + 1) // 2 if Sq > 1 else 300
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(B, 1, 1, Sk) > 0.3).to(ab.device).expand(B, 1, Sq, Sk).clone()
        mask[0, :, 3] = False  # query 3 of batch 0 sees no key
    elif mask_kind == "additive":
        mask = torch.randn(1, Hq, Sq, Sk).to(ab.device, dtype)
    ins = _inputs(ab, B, Hq, Hkv, Sq, Sk, D, dtype, mask=mask, causal=causal, window=window)
    ins["sinks"] = (torch.randn(Hq) * 2).to(ab.device, dtype)
    grad = ("q", "k", "v", "sinks")
    if dropout_p:
        ins.update(dropout_p=dropout_p, dropout_seed=torch.tensor([2024], device=ab.device))
    check_against_reference(lambda **kw: lmfast.ops.attention(**kw, return_lse=True, backend=ab.name),
                            _sinks_reference, ins, grad=grad, name=f"attention {ab.name} sinks {case}")
    if mask_kind == "bool":
        q, sinks = ins["q"].clone().requires_grad_(), ins["sinks"].clone().requires_grad_()
        o, lse = lmfast.ops.attention(q, ins["k"], ins["v"], mask, causal=causal, sinks=sinks, return_lse=True,
                                      backend=ab.name)
        assert torch.count_nonzero(o[0, :, 3]) == 0 and torch.equal(lse[0, :, 3], sinks.float())
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad((o.float().sum(), lse.sum()), (q, sinks)))
        no_sink = torch.full_like(sinks, float("-inf"))
        o2, lse2 = lmfast.ops.attention(q, ins["k"], ins["v"], mask, causal=causal, sinks=no_sink, return_lse=True,
                                        backend=ab.name)
        o1, lse1 = lmfast.ops.attention(q, ins["k"], ins["v"], mask, causal=causal, return_lse=True, backend=ab.name)
        assert torch.equal(o2, o1) and torch.equal(lse2, lse1)


SOFTCAP_CASES = {  # (B, Hq, Hkv, Sq, Sk, D, mask kind, causal, window, dropout_p)
    "gqa, causal, key padding": (1, 4, 2, 40, 300, 32, "bool", True, None, 0.0),
    "window, additive mask": (2, 2, 1, 24, 24, 16, "additive", True, 7, 0.0),
    "decoding, long cache": (1, 8, 2, 1, 700, 64, None, True, None, 0.0),  # Triton's split path, the CPU's splits
    "long queries": (1, 2, 1, 300, 300, 64, None, False, None, 0.0),     # several tiles each way (CPU bf16: brgemm)
    "dropout": (1, 4, 2, 13, 45, 32, None, False, None, 0.3),
}


@pytest.mark.parametrize("case", SOFTCAP_CASES)
def test_logit_softcapping(case, ab, dtype):
    """Gemma 2's logit softcapping: scores s = c tanh(scale q k^T / c) before the mask, forward
    (o, lse) and the gradients of q, k, v and an additive mask, against the float64 reference.
    q and k are scaled up so that scores reach a few times the cap (tanh far from linear: the
    test fails without the cap, or with its derivative left out of the backward)."""
    B, Hq, Hkv, Sq, Sk, D, mask_kind, causal, window, dropout_p = SOFTCAP_CASES[case]
    if ab.slow and Sq * Sk > 30_000:  # the Triton interpreter: shorter rows, still several key tiles
        Sq, Sk = (Sq + 1) // 2 if Sq > 1 else 1, 600 if Sq == 1 else 260
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(B, 1, 1, Sk) > 0.3).to(ab.device).expand(B, 1, Sq, Sk)
    elif mask_kind == "additive":
        mask = torch.randn(1, Hq, Sq, Sk).to(ab.device, dtype)
    ins = _inputs(ab, B, Hq, Hkv, Sq, Sk, D, dtype, mask=mask, causal=causal, window=window)
    ins["q"] = ins["q"] * 3  # scores ~ N(0, 9): out to ~3 caps of 3.0
    ins["softcap"] = 3.0
    if dropout_p:
        ins.update(dropout_p=dropout_p, dropout_seed=torch.tensor([7], device=ab.device))
    grad = ("q", "k", "v", "attn_mask") if mask_kind == "additive" else ("q", "k", "v")
    check_against_reference(lambda **kw: lmfast.ops.attention(**kw, return_lse=True, backend=ab.name),
                            _reference_with_seed, ins, grad=grad, name=f"attention {ab.name} softcap {case}")


def test_softcap_tanh_is_within_ulps_of_the_exact_one(ab, dtype):
    """The kernels' own tanh, value by value: with one key k = e_0 and scale 1, a query's
    score is its first element x and its lse is the capped score c tanh(x / c) (exp(0) = 1),
    float32 for every input dtype; the gradient of lse is the cap's derivative (1 - t^2) e_0.
    Against float64 over x / c from 1e-4 to 20 (both sides of the tanh's switch at 0.625) and
    the special values: a relative error within 4 float32 epsilons (the tanh's 2 ulps, the
    divide's and the multiply's rounding), where a coarser tanh (tanh(y) = y below 0.01, say,
    or one in float16) is off by 30 and more."""
    c = 3.0
    n = 512 if ab.slow else 8192
    ratio = torch.logspace(-4, math.log10(20), n // 2, dtype=torch.float64)
    x = torch.cat([ratio, -ratio]) * c
    x[:3] = torch.tensor([0.0, 0.625 * c, -0.625 * c])
    q = torch.zeros(1, 1, n, 16, dtype=dtype)
    q[0, 0, :, 0] = x.to(dtype)
    k = torch.zeros(1, 1, 1, 16, dtype=dtype)
    k[0, 0, 0, 0] = 1
    q, k = q.to(ab.device).requires_grad_(), k.to(ab.device)
    o, lse = lmfast.ops.attention(q, k, torch.ones_like(k), scale=1.0, softcap=c, return_lse=True, backend=ab.name)
    x = q.detach()[0, 0, :, 0].double().cpu()  # what the kernels saw, rounded to dtype
    exact_t = torch.tanh(x / c)
    eps32 = torch.finfo(torch.float32).eps
    got = lse[0, 0].double().cpu()
    rel = (got - c * exact_t).abs() / (c * exact_t.abs()).clamp_min(torch.finfo(torch.float32).tiny)
    assert rel.max() <= 4 * eps32, f"{ab.name}: capped score {rel.max() / eps32:.1f} eps off at x = {x[rel.argmax()]}"
    (dq,) = torch.autograd.grad(lse.sum(), q)
    exact_d = (1 - exact_t) * (1 + exact_t)
    err = (dq[0, 0, :, 0].double().cpu() - exact_d).abs()
    budget = 4 * eps32 + exact_d * torch.finfo(dtype).eps  # the derivative, then dq's rounding to dtype
    assert (err <= budget).all(), f"{ab.name}: cap derivative off by {err.max():.2e} at x = {x[(err / budget).argmax()]}"


def test_softcap_gradcheck_cpu_float64():
    """The C++ backward through the cap, against finite differences (float64, the CPU path)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) * 2
    k, v = (torch.randn(1, 1, 7, 8, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(1, 2, 5, 7, generator=g, dtype=torch.float64)
    for t in (q, k, v, bias):
        t.requires_grad_()
    f = lambda q, k, v, bias: lmfast.ops.attention(q, k, v, bias, causal=True, softcap=1.5, return_lse=True,  # noqa: E731
                                                    backend="cpu")
    assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_query_blocks_that_see_no_key_past_the_first_key_tile(ab):
    """Causal with Sq - Sk = 150: the first 150 queries see no key, so (CPU) a whole backward
    query block saw no key tile, and with Sk past one key tile the empty range of tiles was
    taken as keys [512, 300): a crash (memset of a negative length), found by the long fuzz
    profile on the CPU backward that keeps whole rows of p."""
    _check(ab, "causal Sq=450 Sk=300", _inputs(ab, 1, 2, 1, 450, 300, 16, torch.float32, causal=True))


BACKWARD_SPLITS = {  # (B, Hq, Hkv, Sq, Sk, causal, window): what the CPU backward's plan makes of it
    "one head, causal": (1, 1, 1, 700, 700, True, None),         # 6 query blocks, cost-balanced chunks (some empty)
    "gqa, window": (1, 6, 2, 300, 520, True, 100),                 # chunks span heads; keys 0-120 seen by no query
    "mqa, short queries": (1, 4, 1, 40, 1000, False, None),        # one query block: a chunk per head
    "33 kv heads": (33, 1, 1, 150, 64, False, None),                # 33 >= 32 (b, kv head)s: no split
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", BACKWARD_SPLITS)
def test_cpu_backward_splits_few_kv_heads_into_chunks(name, dtype):
    """The CPU backward's work per (b, kv head) owns that head's dk, dv; where the (b, kv
    head)s are fewer than 32, their query blocks are cut into chunks of about equal cost, each
    summing its own dk, dv partial over the keys its rows see, added up in order afterwards.
    Here: a single head (whose backward ran on one core before), chunks across the heads of a
    group with keys no query sees (their dk, dv must be exactly 0), short queries, and a shape
    with enough heads not to split; float32, the bfloat16 brgemm path and float16 (widened).
    (float64: test_gradcheck_cpu_float64 splits 2 kv heads into 2 chunks each.)"""
    cpu = types.SimpleNamespace(name="cpu", device="cpu")
    B, Hq, Hkv, Sq, Sk, causal, window = BACKWARD_SPLITS[name]
    ins = _inputs(cpu, B, Hq, Hkv, Sq, Sk, 64, dtype, causal=causal, window=window)
    _check(cpu, f"backward split {name}", ins)
    if window is not None:
        q, k, v = (ins[n].detach().requires_grad_() for n in "qkv")
        o = lmfast.ops.attention(q, k, v, causal=causal, window=window, backend="cpu")
        dk, dv = torch.autograd.grad(o, (k, v), torch.randn_like(o))
        unseen = Sk - Sq - window + 1  # keys before the first query's window
        assert torch.count_nonzero(dk[:, :, :unseen]) == 0 and torch.count_nonzero(dv[:, :, :unseen]) == 0
        assert torch.count_nonzero(dk[:, :, unseen:]) > 0


def test_scale_and_non_contiguous_layouts(ab):
    # (B, S, H, D) tensors viewed as (B, H, S, D), as Hugging Face models produce them
    q = torch.randn(2, 33, 4, 64, device=ab.device).transpose(1, 2)
    k = torch.randn(2, 40, 2, 64, device=ab.device).transpose(1, 2)
    v = torch.randn(2, 40, 2, 64, device=ab.device).transpose(1, 2)
    assert not q.is_contiguous()
    _check(ab, "non-contiguous", {"q": q, "k": k, "v": v, "attn_mask": None, "causal": True, "scale": 0.3, "window": None})


def test_empty(ab):
    for Sq, Sk in ((0, 5), (5, 0)):
        q = torch.randn(1, 2, Sq, 16, device=ab.device, requires_grad=True)
        k = torch.randn(1, 2, Sk, 16, device=ab.device, requires_grad=True)
        v = torch.randn(1, 2, Sk, 16, device=ab.device, requires_grad=True)
        o, lse = lmfast.ops.attention(q, k, v, return_lse=True, backend=ab.name)
        assert o.shape == q.shape and torch.count_nonzero(o) == 0 and torch.isneginf(lse).all()
        grads = torch.autograd.grad(o.sum(), (q, k, v))
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("Sq", [3, 200], ids=["decode", "long-queries"])
def test_value_head_dim_zero(Sq, ab, dtype):
    """v with head dim 0: o is (B, Hq, Sq, 0); lse and the gradients of q and k (through lse)
    within the budget. (bfloat16 on the CPU's brgemm path raised std::bad_alloc.)"""
    ins = _inputs(ab, 1, 2, 2, Sq, Sq, 16, dtype, causal=True, Dv=0)
    assert lmfast.ops.attention(**ins, backend=ab.name).shape == (1, 2, Sq, 0)
    _check(ab, f"Dv=0 Sq={Sq}", ins, grad=("q", "k"))


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
@pytest.mark.parametrize("Dv", [8, 5, 11], ids=["Dv=D", "Dv<D", "Dv>D"])
def test_gradcheck_cpu_float64(dropout_p, Dv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 9, Dv, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(1, 1, 5, 9, dtype=torch.float64, generator=g, requires_grad=True)
    seed = torch.tensor([77])  # (dropout: the same mask in every call gradcheck makes)

    def f(q, k, v, bias):
        return lmfast.ops.attention(q, k, v, bias, causal=True, window=6, return_lse=True, dropout_p=dropout_p,
                                    dropout_seed=seed, backend="cpu")

    assert torch.autograd.gradcheck(lambda *a: tuple(t.nan_to_num(0.0, 0.0, 0.0) for t in f(*a)), (q, k, v, bias))


def test_cpu_forward_holds_no_score_matrix():
    """Peak memory of a CPU forward at Sq = Sk = 8192: a (Sq, Sk) float32 score matrix alone
    would be 256 MiB; the flash kernel's tiles are under 1 MiB per thread."""
    code = (
        "import torch, lmfast\n"
        "q, k, v = (torch.randn(1, 1, 8192, 64) for _ in range(3))\n"
        "def peak():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "lmfast.ops.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend='cpu')  # load, warm up\n"
        "before = peak()\n"
        "o = lmfast.ops.attention(q, k, v, causal=True, backend='cpu')\n"
        "print((peak() - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir(), env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    grew_mib = int(out.stdout.strip())
    assert grew_mib < 32, f"peak memory grew by {grew_mib} MiB; a score matrix would be 256 MiB"


def test_compile_fullgraph(ab):
    torch._dynamo.reset()

    def block(q, k, v, pad):
        return lmfast.ops.attention(q, k, v, pad, causal=True, backend=ab.name).square().sum()

    for Dv in (32, 24):  # (and a value head dim other than the query's: the fake impl's o takes it)
        ins = _inputs(ab, 2, 4, 2, 16, 24, 32, torch.float32, Dv=Dv)
        q, k, v = (ins[n].requires_grad_() for n in "qkv")
        pad = torch.rand(2, 1, 1, 24, device=ab.device) > 0.2
        want = torch.autograd.grad(block(q, k, v, pad), (q, k, v))
        got = torch.autograd.grad(torch.compile(block, backend="aot_eager", fullgraph=True)(q, k, v, pad), (q, k, v))
        torch.testing.assert_close(got, want)


def test_opcheck(ab):
    lmfast.backends()
    ns = getattr(torch.ops, {"cpu": "lmfast_C", "cuda": "lmfast_C", "triton": "lmfast_triton"}[ab.name])
    ins = _inputs(ab, 2, 4, 2, 9, 13, 16, torch.float32)
    mask = torch.randn(1, 4, 9, 13, device=ab.device).expand(2, 4, 9, 13)
    torch.library.opcheck(ns.attention_fwd, (ins["q"], ins["k"], ins["v"], mask, 0.25, True, 5))
    seed = torch.tensor([3], device=ab.device)
    torch.library.opcheck(ns.attention_fwd, (ins["q"], ins["k"], ins["v"], mask, 0.25, True, 5, 0.3, seed))
    torch.library.opcheck(ns.attention_fwd, (ins["q"], ins["k"], ins["v"], mask, 0.25, True, 5, 0.0, None, 2.0))
    for v in (ins["v"][..., :12].contiguous(), torch.cat([ins["v"], ins["v"][..., :4]], -1)):  # Dv < D, Dv > D
        torch.library.opcheck(ns.attention_fwd, (ins["q"], ins["k"], v, mask, 0.25, True, 5))
    docs = cu_seqlens([4, 5], ab.device), cu_seqlens([6, 7], ab.device)  # packed documents (a batch of one)
    one = {n: ins[n][:1] for n in "qkv"}
    torch.library.opcheck(ns.attention_fwd, (one["q"], one["k"], one["v"], mask[:1], 0.25, True, 5, 0.0, None, 0.0,
                                             *docs))


def test_compile_fullgraph_with_packed_documents(ab):
    """cu_seqlens are tensor arguments of the kernel ops: traced without a graph break (their
    values checked at run time), forward and gradients as eager."""
    torch._dynamo.reset()
    cq, ck = cu_seqlens([7, 1, 8], ab.device), cu_seqlens([9, 3, 12], ab.device)

    def block(q, k, v):
        return lmfast.ops.attention(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                    backend=ab.name).square().sum()

    ins = _inputs(ab, 1, 4, 2, 16, 24, 32, torch.float32)
    q, k, v = (ins[n].requires_grad_() for n in "qkv")
    want = torch.autograd.grad(block(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(block, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    torch.testing.assert_close(got, want)


def test_triton_tiles_follow_the_wider_head_dim():
    """The autotuner's candidate tiles (and the fixed tile without autotuning) come from the
    bucket of the wider of q's and v's head-dim blocks: DeepSeek's MLA (192 over 128) takes the
    256 bucket's smaller tiles, which fit the shared memory. Called as Triton's autotuner calls
    the prune (the launch's constexprs as keyword arguments)."""
    from lmfast.kernels import attention as kernels

    tuned, table = kernels._TUNED[kernels._attn_fwd_kernel]
    for block_d, block_dv, bucket in [(256, 128, 256), (64, 128, 128), (64, 64, 64), (128, 16, 128)]:
        assert kernels._tile_bucket({"BLOCK_D": block_d, "BLOCK_DV": block_dv}) == bucket
        kept = tuned.early_config_prune(tuned.configs, {}, BLOCK_D=block_d, BLOCK_DV=block_dv)
        assert kept == table[bucket], (block_d, block_dv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning needs a GPU (the interpreter runs fixed tiles)")
def test_autotuned_launch(monkeypatch):
    monkeypatch.setenv("LMFAST_AUTOTUNE", "1")
    ab = types.SimpleNamespace(name="triton", device="cuda")
    _check(ab, "autotuned", _inputs(ab, 2, 8, 2, 300, 300, 128, torch.bfloat16, causal=True))


@pytest.mark.parametrize("mask_kind,dtype", [("bool", torch.bfloat16), ("additive", torch.float16)])
def test_decoding_with_a_long_cache(mask_kind, dtype, ab):
    """Few query rows per kv head against a long cache: on a GPU (and in the interpreter) the
    forward splits the keys over programs and combines their partial softmaxes. (float32 runs
    this path in test_lengths' Sq = 1 and 17 against 1000 keys.)"""
    B, Hq, Hkv, Sq, Sk = 2, 8, 2, 3, 600
    pad = torch.rand(B, 1, 1, Sk, device=ab.device) > 0.1
    mask = pad if mask_kind == "bool" else torch.randn(B, 1, Sq, Sk, device=ab.device).to(dtype)
    _check(ab, f"decode {mask_kind}", _inputs(ab, B, Hq, Hkv, Sq, Sk, 64, dtype, mask=mask, causal=True, window=500))
    _check(ab, f"decode {mask_kind} no causal", _inputs(ab, B, Hq, Hkv, Sq, Sk, 64, dtype, mask=mask))


def test_nan_inputs_give_nan_rows_not_zeros(ab):
    # Found by tests/test_fuzz.py: a NaN score passed for a masked one (std::max(-inf, NaN) is
    # -inf), so a NaN query row came out as zeros with lse = -inf instead of NaN.
    ins = _inputs(ab, 1, 2, 1, 17, 33, 16, torch.float32)
    ins["q"][0, 1, 3, 5] = float("nan")  # one query row
    ins["k"][0, 0, 7, 0] = float("inf")  # one key: every row that sees it gets inf - inf = NaN
    _check(ab, "nan in q, inf in k", ins, grad=())
    _check(ab, "nan in q, inf in k, causal", {**ins, "causal": True}, grad=())
    # Rows with a +inf score and a NaN one: lse is NaN, not +inf (a max that skips NaN gave
    # +inf; found by the fuzz). q's first dim > 0: key 7 scores +inf in every row, key 400 NaN
    # (another key tile, and another split of the decoding path, whose combine must see it).
    both = _inputs(ab, 1, 2, 1, 17, 600, 16, torch.float32)
    both["q"][..., 0] = both["q"][..., 0].abs() + 0.1
    both["k"][0, 0, 7, 0] = float("inf")
    both["k"][0, 0, 400, 1] = float("nan")
    _check(ab, "+inf and nan scores in each row", both, grad=())
    _check(ab, "+inf and nan scores in each row, decoding", {**both, "q": both["q"][:, :, -1:]}, grad=())
    tiny = _inputs(ab, 1, 1, 1, 1, 1, 1, torch.float32)
    tiny["q"].fill_(float("nan"))
    _check(ab, "one nan score", tiny, grad=("q", "k", "v"), trials=1)


@pytest.mark.parametrize("Sq", [1, 40])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_inf_in_k_at_a_key_a_row_cannot_see_stays_out_of_that_row(Sq, value, ab):
    """A NaN or inf in k at a key that a boolean mask hides (in a key tile other rows see) or that
    lies above the causal diagonal gives that key the score -inf, as the reference's masked_fill
    does: o and lse are those of the same inputs with the key's k zeroed. (Not so for v: there
    p = 0 times NaN is NaN, in every kernel's p @ v as in the reference's; README: attention.)"""
    ins = _inputs(ab, 1, 2, 1, Sq, 200, 64, torch.float32)
    mask = torch.ones(1, 1, Sq, 200, dtype=torch.bool, device=ab.device)
    mask[..., 3] = False  # hidden from every row, in the first key tile
    cases = {"bool-masked": (3, dict(attn_mask=mask)), "above the diagonal": (199, dict(causal=True))}
    for name, (key, kw) in cases.items():
        if name == "above the diagonal" and Sq == 1:
            continue  # (the one row sees every key)
        bad, zeroed = ins["k"].clone(), ins["k"].clone()
        rows = slice(0, Sq - 1) if name == "above the diagonal" else slice(None)  # the rows that cannot see it
        bad[0, 0, key, 5], zeroed[0, 0, key] = value, 0.0
        got = lmfast.ops.attention(ins["q"], bad, ins["v"], **kw, return_lse=True, backend=ab.name)
        want = lmfast.ops.attention(ins["q"], zeroed, ins["v"], **kw, return_lse=True, backend=ab.name)
        for t, w in zip(got, want):
            assert torch.isfinite(t[:, :, rows]).all(), f"{value} in k at key {key} ({name}) reached a row"
            torch.testing.assert_close(t[:, :, rows], w[:, :, rows], msg=name)


@pytest.mark.parametrize("Sk", [1, 5])
def test_huge_scores_keep_finite_gradients(Sk, ab):
    """Found by the long fuzz profile: with q ~ 1e30 (float32) a score is ~1e29, and the
    backward's recomputed score differs from the forward's by an ulp of that (~1e22), so
    p = exp(s - lse) came out exp(+1e22) = inf and every gradient of the row NaN, where the
    reference's are finite (0 with one key). Triton's p is now capped at exp(0) = 1 and, with
    every key of the row in one key block, taken from the row's own max; the CPU backward
    takes every row's p from its own max."""
    def inputs():
        ins = _inputs(ab, 1, 2, 1, 3, Sk, 8, torch.float32)
        ins["q"] = (torch.rand(ins["q"].shape, device=ab.device) * 2 - 1) * 1e30
        return ins
    _check(ab, f"q ~ 1e30, Sk={Sk}", inputs, trials=8)


@pytest.mark.parametrize("Sk", [300, 1000])
def test_one_key_taking_all_the_weight_gives_the_unfused_gradient(Sk, ab):
    """Found by the long fuzz profile: with q, k ~ 1e15 (float32) every row puts all of its
    weight on one key (p = 1 exactly), where an unfused backward's dp - rowsum(p dp) is
    exactly 0 and dq = scale dlse k. The backward took delta = rowsum(do o), the same sum in
    another order, and with |v| ~ 1e4 its rounding made dq 2% wrong, 1e4 x eager's error,
    once the keys spanned more than one key tile (the single-tile path already took delta from
    p dp). The CPU backward now keeps whole rows of p and dp; Triton's is FlashAttention-2's
    (README: attention, backward precision)."""
    if ab.name != "cpu":
        pytest.skip("Triton's backward takes delta = rowsum(do o), not rowsum(p dp), tile by tile "
                    "(README: attention, backward precision)")
    def inputs():
        ins = _inputs(ab, 1, 2, 1, 17, Sk, 64, torch.float32)
        ins["q"], ins["k"], ins["v"] = ins["q"] * 1e15, ins["k"] * 1e15, ins["v"] * 1e4
        return ins
    _check(ab, f"one-hot rows, Sk={Sk}", inputs)


# ---- attention dropout ---------------------------------------------------------------------------

def _reference_with_seed(dropout_seed=None, **kw):
    """The reference, given the seed the ops take (an int64 tensor) or none."""
    return reference.attention(**kw, dropout_seed=None if dropout_seed is None else int(dropout_seed))


DROPOUT_CASES = {  # (B, Hq, Hkv, Sq, Sk, D, mask kind, causal, window)
    "gqa, key padding": (2, 4, 2, 37, 61, 64, "bool", False, None),
    "causal, additive mask": (1, 2, 1, 70, 70, 32, "additive", True, None),
    "window": (1, 2, 2, 40, 90, 16, None, True, 20),
    "decoding, long cache": (1, 8, 2, 1, 700, 64, None, True, None),  # the split-keys forward paths
}


@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_dropout_matches_the_reference_with_the_same_mask(case, ab, dtype):
    """With dropout, the kernels drop the entries of softmax(s) that lmfast.reference.dropout_keep
    (the hash of seed, row and key) drops, scale the rest by 1 / (1 - p), and their backward
    regenerates that mask: outputs, lse (no dropout in it) and gradients against the float64
    reference with the same seed, under the error budget."""
    B, Hq, Hkv, Sq, Sk, D, mask_kind, causal, window = DROPOUT_CASES[case]
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(B, 1, 1, Sk) > 0.3).to(ab.device)
    elif mask_kind == "additive":
        mask = torch.randn(1, Hq, Sq, Sk).to(ab.device, dtype)
    ins = _inputs(ab, B, Hq, Hkv, Sq, Sk, D, dtype, mask=mask, causal=causal, window=window)
    for p, seed in ((0.3, 12345), (0.85, 2**62 + 7)):  # (a seed past 32 bits)
        ins.update(dropout_p=p, dropout_seed=torch.tensor([seed], device=ab.device))
        check_against_reference(lambda **kw: lmfast.ops.attention(**kw, return_lse=True, backend=ab.name),
                                _reference_with_seed, ins, name=f"attention {ab.name} dropout {p} {case}",
                                grad=("q", "k", "v") + (("attn_mask",) if mask_kind == "additive" else ()))


@pytest.mark.parametrize("Sq,Sk", [(1, 700), (45, 60)], ids=["decode", "prefill"])
@pytest.mark.parametrize("D,Dv", [(40, 24), (24, 40)], ids=lambda d: str(d))
def test_value_head_dim_with_dropout_softcap_and_window(D, Dv, Sq, Sk, ab, dtype):
    """v's own head dim where dropout (p v and dv take the dropped p), the softcap and a window
    act too, on the decoding (split keys) and prefill paths, forward and backward."""
    B, Hq, Hkv = 1, 4, 2
    ins = _inputs(ab, B, Hq, Hkv, Sq, Sk, D, dtype, causal=True, window=50, Dv=Dv)
    ins["q"] = ins["q"] * 3  # scores out to a few caps
    ins.update(softcap=3.0, dropout_p=0.3, dropout_seed=torch.tensor([99], device=ab.device))
    check_against_reference(lambda **kw: lmfast.ops.attention(**kw, return_lse=True, backend=ab.name),
                            _reference_with_seed, ins, grad=("q", "k", "v"),
                            name=f"attention {ab.name} D={D} Dv={Dv} dropout softcap window Sq={Sq}")


def test_dropout_mask_read_out_of_the_kernel(ab):
    """q = 0 makes softmax uniform (1 / Sk) and v = I (D = Sk) copies p into o, so o * Sk * (1 - p)
    is the kernel's keep mask: exactly reference.dropout_keep's, over batch, heads and rows."""
    B, H, S, p = 2, 3, 64, 0.25
    q = torch.zeros(B, H, 40, S, device=ab.device)
    k = torch.randn(B, H, S, S, device=ab.device)
    v = torch.eye(S, device=ab.device).expand(B, H, S, S)
    seed = torch.tensor([987654321], device=ab.device)
    o = lmfast.ops.attention(q, k, v, dropout_p=p, dropout_seed=seed, backend=ab.name)
    keep = o * S * (1 - p)
    assert torch.allclose(keep, keep.round(), atol=1e-5)
    rows = torch.arange(B * H * 40).view(B, H, 40, 1)
    want = reference.dropout_keep(987654321, rows, torch.arange(S), p)
    assert torch.equal(keep.round().bool().cpu(), want)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_specification_is_unbiased_and_uncorrelated(p):
    """reference.dropout_keep (the mask every kernel follows): over a million entries the keep
    rate is 1 - p, as are the rates of single rows and of single keys, neighbouring keys and
    rows are uncorrelated, and another seed gives an independent mask (5-sigma bounds)."""
    rows, cols = torch.arange(1024).view(-1, 1), torch.arange(1024)
    keep = reference.dropout_keep(2024, rows, cols, p).double()
    n, q = keep.numel(), 1 - p
    sigma = (p * q / n) ** 0.5
    assert abs(keep.mean().item() - q) < 5 * sigma
    for rates in (keep.mean(1), keep.mean(0)):  # per row, per key: 1024 entries each
        z = (rates - q) / (p * q / 1024) ** 0.5
        assert z.abs().max() < 5.5 and abs(z.std().item() - 1) < 0.15
    x = (keep - q) / (p * q) ** 0.5
    for a, b in ((x[:, 1:], x[:, :-1]), (x[1:], x[:-1])):  # neighbouring keys, neighbouring rows
        assert abs((a * b).mean().item()) < 5 / n ** 0.5
    other = (reference.dropout_keep(2025, rows, cols, p).double() - q) / (p * q) ** 0.5
    assert abs((x * other).mean().item()) < 5 / n ** 0.5


def test_dropout_is_reproducible_and_fresh_per_call(ab):
    """A given seed gives the same bits; torch.manual_seed fixes the drawn seeds; each call
    draws a new mask; dropout_p=0 is the plain kernel, bit for bit."""
    ins = _inputs(ab, 1, 4, 2, 33, 47, 32, torch.float32, causal=True)
    q, k, v = ins["q"], ins["k"], ins["v"]

    def run(**kw):
        return lmfast.ops.attention(q, k, v, causal=True, backend=ab.name, **kw)
    seed = torch.tensor([5], device=ab.device)
    assert torch.equal(run(dropout_p=0.2, dropout_seed=seed), run(dropout_p=0.2, dropout_seed=seed))
    torch.manual_seed(3)
    a, b = run(dropout_p=0.2), run(dropout_p=0.2)
    torch.manual_seed(3)
    assert torch.equal(run(dropout_p=0.2), a) and not torch.equal(a, b)
    assert torch.equal(run(dropout_p=0.0), run())


def test_compile_fullgraph_with_dropout(ab):
    """The seed is drawn inside the compiled graph (torch.randint), so compiled training with
    dropout traces without a graph break and draws the seeds eager would."""
    torch._dynamo.reset()

    def block(q, k, v):
        return lmfast.ops.attention(q, k, v, causal=True, dropout_p=0.3, backend=ab.name).square().sum()

    ins = _inputs(ab, 2, 4, 2, 16, 24, 32, torch.float32)
    q, k, v = (ins[n].requires_grad_() for n in "qkv")
    torch.manual_seed(11)
    want = torch.autograd.grad(block(q, k, v), (q, k, v))
    torch.manual_seed(11)
    got = torch.autograd.grad(torch.compile(block, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    torch.testing.assert_close(got, want)


# ---- packed documents (cu_seqlens) ----------------------------------------------------------

# Documents packed in a batch of one: (query lengths, key lengths, causal, window). Odd lengths,
# an empty document, a one-token one; on the C++ backends long enough that documents start and
# end inside and across their tiles (128 / 256 rows and keys); interpreted Triton, its 16-64.
def _document_cases(interpreted: bool):
    long = [37, 0, 1, 60, 22] if interpreted else [300, 0, 1, 257, 150]
    return {
        "causal": (long, long, True, None),
        "bidirectional": (long, long, False, None),
        "causal window": (long, long, True, 7),
        "keys past the queries": ([3, 10, 1], [40, 10, 70], True, None),  # chunked prefill, bottom-right
        "queries past the keys": ([12, 5, 9], [4, 5, 0], True, None),    # rows that see nothing: zeros
        "decoding": ([1, 1, 2], [300, 200, 250], True, None),            # the key-split paths
        # continuous batching: one new token per sequence, each against its own cache (one empty)
        "decoding many sequences": ([1] * 9, [130, 0, 600, 1, 77, 300, 2, 256, 40], True, None),
    }


@pytest.mark.parametrize("case", _document_cases(False))
def test_packed_documents(case, ab, dtype):
    """cu_seqlens_q / cu_seqlens_k: each query sees its own document's keys, causal and window
    inside it; o, lse and the q, k, v gradients within budget (grouped-query heads)."""
    interpreted = ab.name == "triton" and ab.device == "cpu"
    lens_q, lens_k, causal, window = _document_cases(interpreted)[case]
    ins = _inputs(ab, 1, 4, 2, sum(lens_q), sum(lens_k), 32, dtype, causal=causal, window=window)
    ins.update(cu_seqlens_q=cu_seqlens(lens_q, ab.device), cu_seqlens_k=cu_seqlens(lens_k, ab.device))
    _check(ab, f"documents {case}", ins)


@pytest.mark.parametrize("Sq,Sk", [(3, 700), (45, 60)], ids=["decode", "prefill"])
def test_packed_documents_with_masks_dropout_softcap_and_value_head_dim(Sq, Sk, ab, dtype):
    """Documents with what else acts on a row: an additive mask (and its gradient), dropout,
    the softcap and v's own head dim, on the decoding and prefill paths."""
    lens_q = [1, Sq - 1] if Sq < 10 else [20, 25]
    lens_k = [Sk - 300, 300] if Sq < 10 else [20, 40]
    ins = _inputs(ab, 1, 4, 2, Sq, Sk, 24, dtype, causal=True, Dv=40,
                  mask=torch.randn(1, 4, Sq, Sk, device=ab.device).to(dtype))
    ins["q"] = ins["q"] * 3  # scores out to a few caps
    ins.update(softcap=3.0, dropout_p=0.3, dropout_seed=torch.tensor([7], device=ab.device),
               cu_seqlens_q=cu_seqlens(lens_q, ab.device), cu_seqlens_k=cu_seqlens(lens_k, ab.device))
    check_against_reference(lambda **kw: lmfast.ops.attention(**kw, return_lse=True, backend=ab.name),
                            _reference_with_seed, ins, grad=("q", "k", "v", "attn_mask"),
                            name=f"attention {ab.name} documents mask dropout softcap Sq={Sq}")


@pytest.mark.parametrize("lens", [[100, 156], [130, 126, 255], [1, 511], [17, 40]])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cpu_bfloat16_padded_tiles_of_documents(lens, causal):
    """The CPU's bfloat16 kernels on brgemm pad every tile product to multiples of 16 rows and
    32 keys. With packed documents a key tile starts at its document's first key, so a
    document's last tile can end a few keys short of a multiple of 256, the rows' stride (here
    at 256 and 512 keys): its padded keys would pass the end of the rows or land in the next
    document's columns; they go through a scratch tile instead. Against the reference (and,
    under scripts/sanitize_cpu.sh, with no write outside a buffer)."""
    cpu = types.SimpleNamespace(name="cpu", device="cpu")
    ins = _inputs(cpu, 1, 4, 2, sum(lens), sum(lens), 64, torch.bfloat16, causal=causal)
    ins.update(cu_seqlens_q=cu_seqlens(lens, "cpu"), cu_seqlens_k=cu_seqlens(lens, "cpu"))
    _check(cpu, f"bfloat16 documents {lens}", ins)


def test_packed_documents_equal_their_block_diagonal_mask(ab):
    """The same attention as the boolean mask of the documents, which the kernels read (and
    skip tiles by): one meaning, two ways of saying it. Boolean sinks too (sinks compose)."""
    lens = [30, 1, 45, 20]
    S = sum(lens)
    q, k, v = (torch.randn(1, 4, S, 32, device=ab.device) for _ in range(3))
    sinks = torch.randn(4, device=ab.device)
    cu = cu_seqlens(lens, ab.device)
    o, lse = lmfast.ops.attention(q, k, v, causal=True, sinks=sinks, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                  return_lse=True, backend=ab.name)
    mask = _packed_documents(lens, True).to(ab.device)
    o_mask, lse_mask = lmfast.ops.attention(q, k, v, mask, causal=True, sinks=sinks, return_lse=True,
                                            backend=ab.name)
    torch.testing.assert_close(o, o_mask, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(lse, lse_mask, rtol=2e-6, atol=2e-6)


def test_attention_varlen_takes_flash_attentions_layout(ab):
    """attention_varlen: q (total_q, Hq, D), k and v (total_k, Hkv, D / Dv), as FlashAttention's
    varlen function; o (total_q, Hq, Dv) contiguous, lse (Hq, total_q); the same numbers as
    attention on the (1, H, total, D) views."""
    lens_q, lens_k = [5, 17, 9], [5, 20, 12]
    q = torch.randn(sum(lens_q), 4, 16, device=ab.device)
    k = torch.randn(sum(lens_k), 2, 16, device=ab.device)
    v = torch.randn(sum(lens_k), 2, 8, device=ab.device)
    cq, ck = cu_seqlens(lens_q, ab.device), cu_seqlens(lens_k, ab.device)
    o, lse = lmfast.ops.attention_varlen(q, k, v, cq, ck, causal=True, return_lse=True, backend=ab.name)
    assert o.shape == (31, 4, 8) and o.is_contiguous() and lse.shape == (4, 31)
    views = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
    o4, lse4 = lmfast.ops.attention(*views, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True,
                                    backend=ab.name)
    assert torch.equal(o, o4[0].transpose(0, 1)) and torch.equal(lse, lse4[0])


def test_packed_documents_gradcheck_cpu_float64():
    lens_q, lens_k = [3, 0, 4], [3, 3, 5]  # (every row sees a key: lse = -inf has no finite difference)
    q = torch.randn(1, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 11, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 11, 3, dtype=torch.float64, requires_grad=True)
    cq, ck = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    for causal, window in ((False, None), (True, None), (True, 2)):
        assert torch.autograd.gradcheck(
            lambda q, k, v: lmfast.ops.attention(q, k, v, causal=causal, window=window, cu_seqlens_q=cq,
                                                 cu_seqlens_k=ck, return_lse=True, backend="cpu"), (q, k, v))


try:  # a Triton kernel of these tests: each program's run of _document_run
    import triton
    import triton.language as tl

    from lmfast.kernels.attention import _document_run

    @triton.jit
    def _document_runs_kernel(CU, OUT, n_docs, BLOCK: tl.constexpr):
        start, end = _document_run(tl.program_id(0), CU, n_docs, BLOCK)
        tl.store(OUT + 2 * tl.program_id(0), start)
        tl.store(OUT + 2 * tl.program_id(0) + 1, end)
except ImportError:  # (the tests that launch it skip without triton)
    pass


def _triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"  # (on CPU tensors: the interpreter)


def test_triton_document_table_is_each_rows_keys_and_each_keys_rows():
    """The Triton kernels' table of packed documents (_document_bands, one launch): each row's
    [lo, hi) is exactly the keys the reference lets it see, each key's [first, end) exactly the
    rows that see it, both ends nondecreasing; the check entry is 1. Random documents, causal
    and windows (one past Sk), int32 and int64 boundaries, strided ones."""
    pytest.importorskip("triton", reason="triton is not installed")
    from lmfast.kernels import attention as kernels

    gen, device = torch.Generator().manual_seed(3), _triton_device()
    for trial in range(40):
        lens_q, lens_k = random_document_lengths(gen, [1, 2, 3, 9, 40][trial % 5])
        causal, window = trial % 3 != 0, [None, 1, 2, 7, 10**6][trial % 5]
        cq, ck = (cu_seqlens(lens, device).to(torch.int64 if trial % 2 else torch.int32) for lens in (lens_q, lens_k))
        if trial % 3 == 1:  # boundaries every other element of a longer tensor
            cq, ck = (torch.stack([c, c + 999], 1)[:, 0] for c in (cq, ck))
        Sq, Sk = sum(lens_q), sum(lens_k)
        table = kernels._document_bands(cq, ck, Sq, Sk, causal, window, check=True).cpu()
        what = f"documents {lens_q} / {lens_k}, causal={causal}, window={window}"
        assert table.shape == (2 * Sq + 2 * Sk + 2 * len(lens_q) + 3,) and table[-1] == 1, what
        assert_document_bands(reference.documents_keep(cq.cpu(), ck.cpu(), causal, window), table[:Sq],
                              table[Sq:2 * Sq], table[2 * Sq:2 * Sq + Sk], table[2 * Sq + Sk:2 * Sq + 2 * Sk], what)
        boundaries = table[2 * Sq + 2 * Sk:-1].tolist()  # (the kernels' runs of one document)
        assert boundaries == cq.tolist() + ck.tolist(), what


def test_triton_document_runs_cover_each_row_once_inside_one_document_and_block():
    """Under packed documents the Triton kernels' programs take runs of one document's rows (or
    keys), cut where blocks of BLOCK_M start (_document_run): length // BLOCK_M + n_docs programs
    cover every row exactly once, none mixes documents or crosses a block, and none splits a
    document's stretch of a block. Random documents, block sizes 1 to 64."""
    pytest.importorskip("triton", reason="triton is not installed")
    from lmfast.kernels import attention as kernels

    gen, device = torch.Generator().manual_seed(6), _triton_device()
    for trial in range(24):
        lens, _ = random_document_lengths(gen, [1, 2, 3, 9, 40, 100][trial % 6])
        block = [1, 4, 16, 64][trial % 4]
        cu = cu_seqlens(lens, device)
        programs = kernels._blocks_along(sum(lens), block, len(lens), docs=True)
        out = torch.full((programs, 2), -1, dtype=torch.int32, device=device)
        _document_runs_kernel[(programs,)](cu, out, len(lens), BLOCK=block)
        assert_document_runs([tuple(run) for run in out.cpu().tolist()], lens, block)


def test_triton_document_table_costs_the_host_one_allocation_and_one_launch(monkeypatch):
    """Building the table dispatches one torch op (its allocation) and launches one kernel,
    whatever the number of documents: decoding many sequences on a GPU pays no host time per
    document or per tensor op (the tensor-op form took 23 ops a call)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from lmfast.kernels import attention as kernels

    launches = []

    class Launches:  # kernel[grid](...) records the launch instead of running it
        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append(grid)

    monkeypatch.setattr(kernels, "_document_bands_kernel", Launches())
    cq = cu_seqlens([1] * 32, "cpu")
    ck = cu_seqlens([8] * 32, "cpu")
    with dispatched_ops() as dispatched:
        kernels._document_bands(cq, ck, 32, 256, True, None, check=True)
    assert dispatched.ops == ["aten.empty.memory_format"] and len(launches) == 1, (dispatched.ops, launches)


def test_triton_document_table_flags_bad_values_and_stays_in_bounds():
    """Boundaries that cut no documents (negative, falling, past the ends, the wrong end): the
    check entry is 0, and every entry stays in [0, Sk] (row bands) and [0, Sq] (key ranges), so
    that on a GPU the kernels read nothing out of bounds before the device assert reports them."""
    pytest.importorskip("triton", reason="triton is not installed")
    from lmfast.kernels import attention as kernels

    gen, device = torch.Generator().manual_seed(4), _triton_device()
    for trial in range(30):
        n_docs = 1 + trial % 6
        Sq, Sk = (int(x) for x in torch.randint(0, 40, (2,), generator=gen))
        cq, ck = (torch.randint(-5, 50, (n_docs + 1,), generator=gen).sort().values for _ in range(2))
        if trial % 2:  # falling somewhere, or only the ends wrong
            cq = cq[torch.randperm(n_docs + 1, generator=gen)]
        else:
            cq[0], ck[0], cq[-1], ck[-1] = 0, 0, Sq + 1, Sk
        table = kernels._document_bands(cq.to(device), ck.to(device), Sq, Sk, True, [None, 3][trial % 2],
                                        check=True).cpu()
        assert table[-1] == 0, (cq, ck, Sq, Sk)
        rows, keys = table[:2 * Sq], table[2 * Sq:2 * Sq + 2 * Sk]
        bq, bk = table[2 * Sq + 2 * Sk:2 * Sq + 2 * Sk + n_docs + 1], table[2 * Sq + 2 * Sk + n_docs + 1:-1]
        assert bool(((rows >= 0) & (rows <= Sk)).all() and ((keys >= 0) & (keys <= Sq)).all()), (cq, ck, Sq, Sk)
        assert bool(((bq >= 0) & (bq <= Sq)).all() and ((bk >= 0) & (bk <= Sk)).all()), (cq, ck, Sq, Sk)
        assert bool((table[Sq:2 * Sq] >= table[:Sq]).all()), (cq, ck, Sq, Sk)  # hi >= lo: no negative extent


def test_triton_forward_asserts_the_document_check():
    """The Triton forward asserts the table's check: bad values that reach the kernels (the op
    layer raises a ValueError for CPU tensors first) stop it. On CPU tensors (the interpreter)
    the assert raises at once; on a GPU it would end the process's CUDA context, so not run there."""
    pytest.importorskip("triton", reason="triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("a failed device assert would end this process's CUDA context")
    from lmfast.kernels import attention as kernels

    q = torch.randn(1, 2, 6, 8)
    for cq, ck in ((torch.tensor([0, 2, 6]), torch.tensor([0, 5, 3])), (torch.tensor([0, 7, 6]), torch.tensor([0, 3, 3]))):
        with pytest.raises(RuntimeError, match="cu_seqlens_q and cu_seqlens_k must start at 0, not decrease"):
            kernels.attention_fwd(q, q[:, :, :3], q[:, :, :3], None, 1.0, True, None, cu_seqlens_q=cq, cu_seqlens_k=ck)
    o, _, _ = kernels.attention_fwd(q, q[:, :, :3], q[:, :, :3], None, 1.0, True, None,
                                    cu_seqlens_q=torch.tensor([0, 2, 6]), cu_seqlens_k=torch.tensor([0, 1, 3]))
    assert o.shape == (1, 2, 6, 8)


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_packed_documents_bad_values(backend, ab):
    """cu_seqlens values that do not cut the rows into documents: ValueError naming the
    argument, on the kernel backends and the reference."""
    if ab.device != "cpu":
        pytest.skip("on a GPU the values are checked by an asynchronous device assert, which would end this "
                    "process's CUDA context")
    name = ab.name if backend == "kernel" else "torch"
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 7, 8)
    good_q, good_k = torch.tensor([0, 2, 6]), torch.tensor([0, 3, 7])
    for cq, ck, match in ((torch.tensor([1, 2, 6]), good_k, "cu_seqlens_q must start at 0, got 1"),
                          (good_q, torch.tensor([0, 5, 3]), "cu_seqlens_k must not decrease, got 5 then 3 at index 2"),
                          (torch.tensor([0, 2, 5]), good_k, r"cu_seqlens_q must end at Sq = 6 \(every row in a "
                                                            r"document\), got 5"),
                          (good_q, torch.tensor([0, 3, 8]), "cu_seqlens_k must end at Sk = 7")):
        with pytest.raises(ValueError, match=match):
            lmfast.ops.attention(q, k, k, cu_seqlens_q=cq, cu_seqlens_k=ck, backend=name)
