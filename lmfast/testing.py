"""The error-budget rule of DESIGN.md, shared by tests and benchmarks.

A kernel's result passes when, against the reference evaluated in float64,

    rms(kernel - ref64)  <=  2 * rms(eager - ref64)  +  finfo(dtype).eps * rms(ref64)

where rms is the root-mean-square over the reference entries in the output dtype's range
(below), "eager" is the same reference evaluated in the input dtype (plain PyTorch), and the
last term is one unit in the last place at the output's scale (zero when the reference is
all zeros, which then must be matched exactly). NaN must appear at the same places as in the
reference, infinities where the reference lies beyond the output dtype's range: a float16
gradient whose float64 value is 68424 is correctly +inf, and a kernel that returned 65504
there would be wrong. Between the largest finite value and the next power of two (65504 to
65536 in float16) rounding may land on either side, so there either is right: a finite
result counts in the error, an infinite one of the reference's sign does not. No test
chooses its own tolerance.

Where eager itself overflows (inf or NaN where the reference is in range), those entries are
left out of eager's error rather than making the budget infinite: the kernel is held to
eager's accuracy on the entries eager got right, and must be finite on the rest.

Why root-mean-square and not the maximum error (DESIGN.md's first wording): gradients carry
the forward's rounding through ill-conditioned backward formulas (softmax's dy - sum(y * dy)
cancels), so one row's errors share one random factor and the maximum over a small tensor is
a noisy statistic. Measured on 400 random inputs each: a plain-PyTorch softmax written as
exp(z - max) / sum, exactly as accurate as eager, failed the max rule on 8-20% of them; under
the RMS rule it and lmfast's kernels failed none once a tensor has >= 16 independent rows,
while kernels that round an intermediate to 16 bits still failed all of them. A single wrong
element still fails: its error is O(scale / sqrt(n)) against eager's O(eps * scale).

float64 inputs (CPU backend, for gradcheck) have no more precise oracle, so the rule does not
apply to them; they are checked with torch.testing.assert_close's float64 defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

BUDGET_FACTOR = 2.0


def _as_tuple(out) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _rms(t: Tensor) -> float:
    return t.square().mean().sqrt().item() if t.numel() else 0.0


def error_budget(eager: Tensor, ref64: Tensor) -> tuple[float, float]:
    """Returns (eager's RMS error, the RMS error a kernel must stay within). The floor is one
    ulp at the reference's RMS scale, and never less than the dtype's smallest subnormal: no
    result in the dtype can be closer than that to a reference that lies between two of them
    (an output of ~1e-46 in float32 is 0 or 1.4e-45)."""
    in_range = _in_range(eager.dtype, ref64)
    eager_ok = in_range & torch.isfinite(eager)
    eager_err = _rms(eager.double()[eager_ok] - ref64[eager_ok])
    return eager_err, budget_from(eager_err, _rms(ref64[in_range]), eager.dtype)


def budget_from(eager_err: float, ref_rms: float, dtype: torch.dtype) -> float:
    """The rule itself, from its statistics: eager's RMS error, the reference's RMS scale, and
    the dtype (for callers that pool errors without materializing them)."""
    info = torch.finfo(dtype)
    return BUDGET_FACTOR * eager_err + max(info.eps * ref_rms, info.smallest_normal * info.eps)


def _in_range(dtype: torch.dtype, ref64: Tensor) -> Tensor:
    """Where the float64 reference is a number that `dtype` can hold finite: below the next
    power of two after its largest value (NaN and past that: out of range)."""
    return ref64.abs() < 2.0 ** math.frexp(torch.finfo(dtype).max)[1]  # 65536 for float16


def assert_within_budget(actual: Tensor, ref64: Tensor, eager: Tensor, name: str = "output") -> None:
    """Raises AssertionError, with the errors, the budget and the worst element, when `actual`
    fails the rule."""
    header = f"{name} ({tuple(actual.shape)}, {actual.dtype})"
    assert actual.dtype == eager.dtype, f"{header}: dtype {actual.dtype}, expected {eager.dtype}"
    assert actual.shape == ref64.shape, f"{header}: shape {tuple(actual.shape)}, expected {tuple(ref64.shape)}"
    a, r = actual.detach().double().cpu(), ref64.detach().double().cpu()
    e = eager.detach().cpu()
    in_range = _in_range(actual.dtype, r)
    eager_err, budget = error_budget(e, r)
    # Where the reference lies near the point where rounding overflows (max + half an ulp),
    # either side is right: a result that close to the reference rounds to inf or to the
    # largest value, both right. Near: within the budget, an ulp at the reference's own scale
    # (eps |r|), or twice eager's own error there where eager is finite (the rule's per-element
    # analog; eager's inf excuses nothing). Past that the result must overflow; short of it (and
    # of the largest value) it must not. (Found by the long fuzz profile: float16 gradients of
    # -65501.8 and -65547.5 that rounding the upstream gradient to float16, as every float16
    # caller's is, moved across -65520, eager's too.)
    info = torch.finfo(actual.dtype)
    overflows_at = 2.0 ** math.frexp(info.max)[1] * (1 - info.eps / 4)  # 65520 for float16
    e64 = e.double()
    eager_off = torch.where(torch.isfinite(e64), (e64 - r).abs(), torch.zeros_like(r))
    near_tol = torch.maximum(torch.maximum(info.eps * r.abs(), BUDGET_FACTOR * eager_off), torch.full_like(r, budget))
    near = torch.isfinite(r) & ((r.abs() - overflows_at).abs() <= near_tol)
    may_overflow = (r.abs() > info.max) | near
    must_overflow = ~in_range & ~near
    for what, pa, must, may in (
            ("NaN", a.isnan(), r.isnan(), r.isnan()),
            ("+inf", a == float("inf"), (r > 0) & must_overflow, (r > 0) & may_overflow),
            ("-inf", a == float("-inf"), (r < 0) & must_overflow, (r < 0) & may_overflow)):
        bad = (pa & ~may) | (must & ~pa)
        if bad.any():
            i = tuple(bad.nonzero()[0].tolist())
            raise AssertionError(f"{header}: {what} placement differs from the reference at {int(bad.sum())} "
                                 f"places, first at index {i}: got {a[i].item():.8g}, reference "
                                 f"{r[i].item():.8g}, eager {e[i].item():.8g}")
    finite = in_range & torch.isfinite(a)
    err = torch.where(finite, (a - r).abs(), torch.zeros_like(a))
    rms_err = _rms(err[finite])
    if rms_err > budget:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{header}: RMS error {rms_err:.3e} exceeds the budget {budget:.3e} "
            f"(2 x eager's RMS error {eager_err:.3e} + 1 ulp at RMS scale {_rms(r[finite]):.3e}, at least a subnormal); "
            f"max error {err.max().item():.3e} (eager's {(e.double() - r)[finite].abs().max().item():.3e}) "
            f"at index {idx}: got {a[idx].item():.8g}, reference {r[idx].item():.8g}, eager {e[idx].item():.8g}")


def check_against_reference(fn: Callable[..., Any], reference: Callable[..., Any],
                            inputs: Mapping[str, Any] | Callable[[], Mapping[str, Any]], *,
                            grad: Iterable[str] = (), name: str = "", seed: int = 0,
                            trials: int = 1) -> None:
    """Runs fn(**inputs), reference(**float64 inputs) and reference(**inputs) (eager), and
    checks every output, and the gradients of the inputs named in `grad` for one random
    upstream gradient per output, against the error budget.

    Tensors are passed to `fn` as given (strides kept: non-contiguous views stay so). The RMS
    of a few numbers is a noisy statistic, so each checked tensor should hold >= 16
    independent values; where one cannot (a weight gradient over a width-1 row is a single
    number), pass `inputs` as a callable and `trials` > 1: errors are then pooled over that
    many independent draws of the inputs before the budget is applied.
    """
    grad = tuple(grad)
    draws = [inputs() if callable(inputs) else inputs for _ in range(trials)]
    checked: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for t, ins in enumerate(draws):
        for label, triple in _run_once(fn, reference, ins, grad, name, seed + t):
            checked.setdefault(label, []).append(triple)
    for label, triples in checked.items():
        if len(triples) == 1:
            assert_within_budget(*triples[0], name=label)
        else:
            assert_within_budget(*(torch.cat([t[i].detach().reshape(-1).cpu() for t in triples])
                                   for i in range(3)), name=f"{label} ({len(triples)} trials)")


def _run_once(fn, reference, inputs, grad, name, seed):
    """Yields (label, (lmfast, ref64, eager)) for every output and requested gradient."""
    if any(isinstance(v, Tensor) and v.dtype == torch.float64 for v in inputs.values()):
        raise ValueError("float64 inputs: the float64 oracle is no more precise than the kernel, so "
                         "the error budget is undefined; use torch.testing.assert_close and gradcheck")

    def leaves(to64: bool) -> dict[str, Any]:
        out = {}
        for k, v in inputs.items():
            if isinstance(v, Tensor):
                v = v.detach()
                if to64 and v.is_floating_point():
                    v = v.double()
                if k in grad:
                    v.requires_grad_(True)
            out[k] = v
        return out

    runs = {"lmfast": (fn, leaves(False)), "ref64": (reference, leaves(True)),
            "eager": (reference, leaves(False))}
    outs = {tag: _as_tuple(f(**args)) for tag, (f, args) in runs.items()}
    n_out = len(outs["ref64"])
    assert len(outs["lmfast"]) == n_out, f"{name}: {len(outs['lmfast'])} outputs, expected {n_out}"
    for i in range(n_out):
        yield f"{name} output {i}", (outs["lmfast"][i], outs["ref64"][i], outs["eager"][i])
    if not grad:
        return

    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs["ref64"]]
    grads = {}
    for tag, (_, args) in runs.items():
        dys = [u.to(device=o.device, dtype=o.dtype) for u, o in zip(upstream, outs[tag])]
        grads[tag] = torch.autograd.grad(outs[tag], [args[k] for k in grad], dys, allow_unused=True)
    for k, g, g64, ge in zip(grad, grads["lmfast"], grads["ref64"], grads["eager"]):
        if g64 is None:
            assert g is None, f"{name}: d{k} should be None (no dependence), got a tensor"
            continue
        assert g is not None, f"{name}: d{k} is None, expected a gradient"
        yield f"{name} d{k}", (g, g64, ge)


# ---- host calls ---------------------------------------------------------------------------------

def dispatched_ops():
    """A context manager recording, in its `.ops`, the ops that reach the dispatcher's Python key
    under it (after composite ops decompose): what a call costs the host, op by op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class DispatchedOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    return DispatchedOps()


# ---- packed documents: the kernels' tables ------------------------------------------------------

def cu_seqlens(lengths, device="cpu", dtype: torch.dtype = torch.int32) -> Tensor:
    """The boundaries (n + 1,) of documents of these lengths packed side by side: 0, then the
    running sums (FlashAttention's cu_seqlens)."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=dtype, device=device)


def random_document_lengths(gen: torch.Generator, n_docs: int) -> tuple[list[int], list[int]]:
    """Query and key lengths of n_docs packed documents: empty ones, one-token ones, longer."""
    def lengths(choices):
        return [choices[i] for i in torch.randint(len(choices), (n_docs,), generator=gen).tolist()]
    return lengths([0, 1, 1, 2, 5, 17, 40]), lengths([0, 1, 3, 8, 30, 70])


def assert_document_runs(runs: list[tuple[int, int]], lengths: list[int], block: int) -> None:
    """A GPU launch's runs of one document each (every program's [start, end), as
    lmfast/kernels/attention.py's _document_run and csrc/documents.h's document_run map them)
    for documents of these lengths and blocks of `block` rows: each in [0, length], the
    non-empty ones covering every row exactly once, none mixing documents or crossing a block,
    none splitting a document's stretch of a block."""
    total = sum(lengths)
    assert all(0 <= start <= end <= total for start, end in runs), (lengths, block)
    doc_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))
    covered = torch.zeros(total, dtype=torch.int32)
    filled = [(start, end) for start, end in runs if end > start]
    for start, end in filled:
        covered[start:end] += 1
        assert doc_of[start] == doc_of[end - 1] and start // block == (end - 1) // block, (lengths, block, start, end)
    assert bool((covered == 1).all()), (lengths, block, covered.tolist())
    # one run per (document, block) pair they share: none split in two
    assert len(filled) == len({(int(doc_of[i]), i // block) for i in range(total)}), (lengths, block)


def assert_document_bands(keep: Tensor, lo: Tensor, hi: Tensor, first: Tensor | None = None,
                          end: Tensor | None = None, what: str = "") -> None:
    """A kernel's table of packed documents against the reference's (Sq, Sk) boolean `keep`
    (lmfast.reference.documents_keep): each query row's keys are exactly [lo, hi) (lo = hi when
    it sees none); where given, each key's rows exactly [first, end); every end nondecreasing
    (the kernels skip tiles by that)."""
    keep = keep.cpu()
    lo, hi = lo.cpu(), hi.cpu()
    for i in range(keep.shape[0]):
        assert keep[i].nonzero().flatten().tolist() == list(range(lo[i], hi[i])) and lo[i] <= hi[i], \
            f"{what}: row {i} sees keys {keep[i].nonzero().flatten().tolist()}, the table says [{lo[i]}, {hi[i]})"
    ends = [lo, hi]
    if first is not None:
        first, end = first.cpu(), end.cpu()
        for j in range(keep.shape[1]):
            assert keep[:, j].nonzero().flatten().tolist() == list(range(first[j], end[j])) and first[j] <= end[j], \
                f"{what}: key {j} is seen by rows {keep[:, j].nonzero().flatten().tolist()}, the table says " \
                f"[{first[j]}, {end[j]})"
        ends += [first, end]
    for e in ends:
        assert bool((e[1:] >= e[:-1]).all()), f"{what}: the table's ends decrease"
