"""Per-call cost at decode sizes (the `overhead` row of `lmfast bench`): each lmfast replacement
against the module or function it replaces, without grad and with a backward, grouped per case
and direction so the two sit side by side. Cases from lmfast.overhead."""

import re

import pytest
import torch

from lmfast import overhead

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAIRS = overhead.pairs()


@pytest.mark.parametrize("side", ["replaced", "lmfast"])
@pytest.mark.parametrize("direction", list(overhead.TARGETS))
@pytest.mark.parametrize("pair", PAIRS, ids=[re.sub(r"[^\w+=]+", "-", p.case).strip("-") for p in PAIRS])
def test_per_call_cost(benchmark, pair, direction, side):
    theirs, ours = pair.build(DEVICE, direction == "fwd+bwd")
    fn = ours if side == "lmfast" else theirs
    fn()  # warm up
    if DEVICE == "cuda":
        call = fn

        def fn():
            call()
            torch.cuda.synchronize()
    benchmark.group = f"per-call {pair.case} {direction} {DEVICE}"
    benchmark.extra_info["module"] = pair.ours if side == "lmfast" else pair.theirs
    benchmark(fn)
