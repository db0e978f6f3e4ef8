"""The model row of `lmfast bench`: a GPT-2-small-shaped model (random weights, built in code,
nothing downloaded), unpatched vs lmfast.patch'ed, prefill and greedy decoding with the KV
cache. Grouped per workload so the two variants sit side by side; extra_info has tokens/s.
Sizes from lmfast.model_benchmarks.GPT2_SIZES (--lmfast-size quick | full)."""

import pytest
import torch

pytest.importorskip("transformers", reason="the model row needs transformers (pip install 'lmfast[bench]')")

from lmfast import model_benchmarks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16


@pytest.fixture(scope="module")
def gpt2(request):
    """{"unpatched": model, "patched": its patched deep copy}, and the workload sizes."""
    prefill, new_tokens, _, _ = model_benchmarks.GPT2_SIZES[(request.config.getoption("--lmfast-size"), DEVICE)]
    unpatched, patched = model_benchmarks.patched_pair(model_benchmarks.gpt2_small_model().to(DEVICE, DTYPE))
    ids = model_benchmarks.gpt2_token_ids(prefill).to(DEVICE)
    return {"unpatched": unpatched, "patched": patched}, ids, new_tokens


def _timed(fn):
    if DEVICE != "cuda":
        return fn

    def synced():
        fn()
        torch.cuda.synchronize()
    return synced


@pytest.mark.parametrize("variant", ["unpatched", "patched"])
def test_gpt2_small_prefill(benchmark, gpt2, variant):
    models, ids, _ = gpt2
    run = torch.no_grad()(lambda: models[variant](ids).logits)
    run()  # warm up
    benchmark.group = f"gpt2-small prefill {ids.shape[1]} tokens {DEVICE}"
    benchmark.pedantic(_timed(run), rounds=5, iterations=1, warmup_rounds=1)
    if not benchmark.disabled:  # (--benchmark-disable, or xdist: ran once, untimed)
        benchmark.extra_info["tokens/s"] = round(ids.shape[1] / benchmark.stats.stats.median, 1)


@pytest.mark.parametrize("variant", ["unpatched", "patched"])
def test_gpt2_small_decode(benchmark, gpt2, variant):
    """Prefill of 32 tokens, then new_tokens greedy tokens (the prefill is included)."""
    models, ids, new_tokens = gpt2
    prompt = ids[:, :32]

    def run():
        return model_benchmarks.greedy(models[variant], prompt, new_tokens, models[variant].config.eos_token_id)
    run()
    benchmark.group = f"gpt2-small decode {new_tokens} tokens {DEVICE}"
    benchmark.pedantic(_timed(run), rounds=3, iterations=1, warmup_rounds=0)
    if not benchmark.disabled:  # (--benchmark-disable, or xdist: ran once, untimed)
        benchmark.extra_info["tokens/s"] = round(new_tokens / benchmark.stats.stats.median, 1)
