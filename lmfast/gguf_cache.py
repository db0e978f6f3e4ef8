"""GGUF models converted once, then loaded from a cache.

transformers' GGUF loader dequantizes every tensor in Python on every load: ~25 s for
SmolLM2-135M on a 2-core CPU, before `lmfast generate --model smollm2` prints a token. Here the
first load converts the file as before, with the file parsed once instead of three times
(_gguf_parsed_once: ~10 s for SmolLM2, 2026-12-08), and keeps the result (the float32 weights
as safetensors, the config without its GGUF quantization entry, the tokenizer and generation
config) under `<cache>/models/<name>-<key>/` (the cache of lmfast._extension: LMFAST_CACHE_DIR,
else $XDG_CACHE_HOME/lmfast or ~/.cache/lmfast); later loads read that folder (0.2-0.3 s). The key
hashes the file's resolved path, size and modification time and the transformers version, so
a changed file or a new converter converts again. The weights are kept in float32 (what the
dequantization gives: GGUF's blocks of scaled 4- to 8-bit values are exact in float32) and cast
to the dtype asked for after loading, as a direct conversion to that dtype does.

Nothing here downloads: both loads read local files only. A cache that cannot be written (a
read-only home) only costs the conversion each time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ._extension import cache_root


def cache_dir_for(gguf_path: str | os.PathLike) -> Path:
    """Where the converted model of this GGUF file is kept (whether or not it is there yet)."""
    import transformers

    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    return cache_root() / "models" / f"{path.stem}-{key.hexdigest()[:16]}"


def load_causal_lm(directory: str, gguf_file: str, dtype: torch.dtype):
    """(tokenizer, causal LM in eval mode, in `dtype`) of directory/gguf_file: from the cache
    when it holds this file's conversion, else converted by transformers' GGUF loader and kept."""
    cached = cache_dir_for(Path(directory, gguf_file))
    if cached.is_dir():
        try:
            tok, model = _load_float32(cached)
            return tok, model.to(dtype).eval()
        except Exception:  # a damaged entry (a disk filled mid-copy, a hand edit): convert again
            shutil.rmtree(cached, ignore_errors=True)
    with _gguf_parsed_once():
        tok, model = _load_float32(directory, gguf_file=gguf_file)
    try:
        _keep(tok, model, cached)
    except Exception:  # (a read-only cache, a model save_pretrained cannot write: this load still
        pass           # works, the next converts again)
    return tok, model.to(dtype).eval()


def _load_float32(source, **gguf):
    """(tokenizer, float32 causal LM) from local files: a converted folder, or with gguf_file=
    a GGUF file in `source`, through transformers' GGUF loader."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True, **gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=True,
                                                              **gguf)
    return tok, model


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers' GGUF loader parses the file three times, for the config, the tokenizer and
    the weights (gguf.GGUFReader: ~5.5 s each for SmolLM2, most of it its 49k-token vocabulary,
    on a 2-core CPU), and builds gguf's tensor-name table for each of the model's submodules (397
    times for SmolLM2, ~7 s). Inside this block the gguf package hands out one reader per file
    and one table per (architecture, layers): the same read-only objects the loader would make
    again (both imported at call time, `from gguf import ...`). A name missing from the
    installed gguf is left as it is."""
    try:
        import gguf
    except ImportError:  # (the loader then says gguf is missing)
        yield
        return
    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map") if hasattr(gguf, name)}
    patched = {}
    if "GGUFReader" in originals:
        open_once = functools.cache(originals["GGUFReader"])  # keyed by the resolved path and mode
        patched["GGUFReader"] = lambda path, mode="r": open_once(os.path.realpath(path), mode)
    if "get_tensor_name_map" in originals:
        patched["get_tensor_name_map"] = functools.cache(originals["get_tensor_name_map"])
    for name in originals:
        setattr(gguf, name, patched[name])
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf, name, original)


def _keep(tok, model, target: Path) -> None:
    """Writes the converted model into a folder of its own, then renames it to `target` in one
    step, so that a reader never sees half of it and two processes converting at once both
    succeed (the second one's copy is dropped)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    # The GGUF quantizer marks the model unserializable (it was quantized); its weights are
    # plain dequantized float32 tensors by now, which save_pretrained writes as they are.
    quantizer = getattr(model, "hf_quantizer", None)
    model.hf_quantizer = None
    try:
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        config = staging / "config.json"  # the copy is not quantized: no GGUF entry for the loader to act on
        fields = json.loads(config.read_text())
        fields.pop("quantization_config", None)
        config.write_text(json.dumps(fields, indent=2))
        os.rename(staging, target)  # (fails if another process kept its conversion first)
    finally:
        model.hf_quantizer = quantizer
        shutil.rmtree(staging, ignore_errors=True)  # (gone after a rename; else a failed copy)
