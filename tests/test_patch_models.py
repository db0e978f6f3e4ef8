"""lmfast.patch on models built in code from small random configs: Hugging Face GPT-2, Qwen2,
Mistral (sliding window), Gemma 2 (attention logit softcapping), Gemma 3 (1 + weight RMSNorms,
q/k norms, a sliding and a global layer), OLMo (LayerNorms without parameters) and Cohere
(bias-free LayerNorms in float32) with the full battery; T5 (relative position bias), DeepSeek V3
(a value head dim other than the query's: logits, gradients, generation), Bloom (attention outside transformers' attention
interface); torch.nn.Transformer / TransformerEncoder; and, for breadth, twenty more decoder
families (Llama, Qwen3, Phi-3, OLMo 2, Granite, StarCoder2, GPT-NeoX, Falcon, Phi, StableLM, Gemma,
GLM-4, EXAONE 4, SmolLM3, OPT, GPT-J, BioGPT, Persimmon, Cohere 2, Nemotron) patched once with
their logits checked. The battery: outputs within the error budget of the unpatched model
(float32, bfloat16, float16), one training step's gradients within budget, KV-cache generation
unchanged, unpatch restores everything. The error budget is DESIGN.md's: against the float64
model, at most twice the unpatched model's own error (lmfast.testing.assert_within_budget)."""

import copy
import subprocess
import tempfile
import sys

import pytest
import torch

import lmfast
from lmfast.testing import assert_within_budget

import transformers  # part of the test extras: missing is a failure (scripts/gpu_check.sh leaves this file out)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _spy_attention(monkeypatch) -> list[dict]:
    """Records each lmfast.ops.attention call: its mask shape, causal, window and (if given) dropout_p,
    softcap and the packed documents' cu_seqlens_q."""
    calls, attention = [], lmfast.ops.attention

    def spy(q, k, v, attn_mask=None, causal=False, scale=None, window=None, **kwargs):
        calls.append({"mask": None if attn_mask is None else tuple(attn_mask.shape), "causal": causal,
                      "window": window, **({"dropout_p": kwargs["dropout_p"]} if kwargs.get("dropout_p") else {}),
                      **({"softcap": kwargs["softcap"]} if kwargs.get("softcap") is not None else {}),
                      **({"documents": kwargs["cu_seqlens_q"].tolist()} if kwargs.get("cu_seqlens_q") is not None
                         else {})})
        return attention(q, k, v, attn_mask, causal=causal, scale=scale, window=window, **kwargs)
    monkeypatch.setattr(lmfast.ops, "attention", spy)
    return calls


# ---- Hugging Face decoders from random configs --------------------------------------------------

VOCAB, WINDOW = 97, 6
# Gemma 2's attention logit cap in these tests: at this model's scores (~0.02 with
# query_pre_attn_scalar 16) a cap of 0.02 is far from linear (its default, 50, would be).
SOFTCAP = 0.02


def _hf_model(arch: str):
    t = transformers
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128, attention_dropout=0.0)
    config = {
        "gpt2": lambda: t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
        "qwen2": lambda: t.Qwen2Config(num_key_value_heads=2, **small),  # grouped-query, biased q/k/v
        "mistral": lambda: t.MistralConfig(num_key_value_heads=2, sliding_window=WINDOW, **small),
        "gemma2": lambda: t.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                                         layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
                                         attn_logit_softcapping=SOFTCAP, **small),
        "gemma3": lambda: t.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                                             layer_types=["sliding_attention", "full_attention"], **small),
        "olmo": lambda: t.OlmoConfig(num_key_value_heads=2, **small),  # LayerNorms without parameters
        "cohere": lambda: t.CohereConfig(num_key_value_heads=2, **small),  # bias-free LayerNorms in float32
    }[arch]()
    config.pad_token_id = 0
    torch.manual_seed(0)
    return t.AutoModelForCausalLM.from_config(config, attn_implementation=_ATTN_IMPLEMENTATION.get(arch, "sdpa")).eval()


# Gemma 2 runs its eager attention: transformers' SDPA path has no softcap (it refuses one).
_ATTN_IMPLEMENTATION = {"gemma2": "eager"}


def _skip_where_this_transformers_cannot_switch_attention(model) -> None:
    """Older transformers (5.17, the GPU machines') cannot switch every model's attention: the
    modeling code of Falcon and GPT-J there bypasses its attention interface (transformers' own
    _can_set_attn_implementation says so), and set_attn_implementation leaves the configs that
    T5's encoder and decoder stacks hold unchanged. Asked of transformers on a copy, not of
    lmfast; lmfast must report such layers as left alone (checked here) and the tests of what it
    serves skip."""
    probe = copy.deepcopy(model)
    can_switch = getattr(type(probe), "_can_set_attn_implementation", lambda: True)()
    if can_switch:
        probe.set_attn_implementation("eager")
        can_switch = all(m.config._attn_implementation == "eager" for m in probe.modules()
                         if isinstance(getattr(m, "config", None), transformers.PretrainedConfig))
    if can_switch:
        return
    report = lmfast.patch(copy.deepcopy(model))
    assert any(why.startswith("attention:") for _, why in report.skipped), report
    pytest.skip(f"transformers {transformers.__version__} cannot switch {type(model).__name__}'s attention "
                "(lmfast reports it and leaves it)")


def _batch(arch: str | None = None):
    """Three rows of 16 tokens: left padding, right padding, none (any padding pattern is legal).
    Gemma 2's rows have no left padding: its eager attention takes the softmax in float32, where
    a float64 model's mask (float64's lowest value) becomes -inf, so the float64 reference's
    left-padded query rows, which see no key, came out NaN and spread to every row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 16), generator=g)
    mask = torch.ones(3, 16, dtype=torch.long)
    if arch != "gemma2":
        mask[0, :5] = 0
    mask[1, -3:] = 0
    return ids, mask


def _generation_inputs(max_new_tokens: int):
    """_batch() with left padding only (generate() wants it), and greedy generate() kwargs."""
    ids, mask = _batch()
    mask[1] = 1
    return ids, dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)


ARCHS = ["gpt2", "qwen2", "mistral", "gemma2", "gemma3", "olmo", "cohere"]


def _windows(arch: str) -> list:
    """The attention window of each of the model's two layers."""
    return {"mistral": [WINDOW, WINDOW], "gemma2": [WINDOW, None], "gemma3": [WINDOW, None]}.get(arch, [None, None])


def _calls(arch: str, mask) -> list[dict]:
    """What _spy_attention records for one forward of the model: a call per layer."""
    cap = {"softcap": SOFTCAP} if arch == "gemma2" else {}
    return [{"mask": mask, "causal": True, "window": w, **cap} for w in _windows(arch)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_decoder_logits(arch, dtype, monkeypatch):
    model = _hf_model(arch)
    ids, mask = _batch(arch)
    keep = mask.bool()  # logits at padded positions are not defined outputs
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(ids, attention_mask=mask).logits
        model.to(dtype)
        eager = model(ids, attention_mask=mask).logits
        classes = [type(m) for m in model.modules()]
        report = lmfast.patch(model)
        calls = _spy_attention(monkeypatch)
        got = model(ids, attention_mask=mask).logits
    previous = _ATTN_IMPLEMENTATION.get(arch, "sdpa")
    assert report.swapped[f"attention (attn_implementation {previous!r} -> 'lmfast')"] == 2
    if arch == "gemma3":  # 4 around attention and MLP and the q/k norms per layer, and the final one
        assert report.swapped["RMSNorm, 1 + weight (Gemma3RMSNorm)"] == 2 * 6 + 1 and not report.skipped
    if arch == "gemma2":  # 4 per layer and the final one
        assert report.swapped["RMSNorm, 1 + weight (Gemma2RMSNorm)"] == 2 * 4 + 1 and not report.skipped
    if arch == "olmo":  # 2 per layer and the final one
        assert report.swapped["LayerNorm, no parameters (OlmoLayerNorm)"] == 2 * 2 + 1 and not report.skipped
    if arch == "cohere":  # 1 per layer (attention and MLP in parallel) and the final one
        assert report.swapped["LayerNorm, in float32 (CohereLayerNorm)"] == 2 + 1 and not report.skipped
    assert_within_budget(got[keep], ref64[keep], eager[keep], f"{arch} logits")
    # the mask arrives as causal (+ window) and a (B, 1, 1, Sk) padding mask, not (Sq x Sk)
    assert calls == _calls(arch, (3, 1, 1, 16) if (mask == 0).any() else None)
    lmfast.unpatch(model)
    assert [type(m) for m in model.modules()] == classes


# Breadth: more decoder families from tiny configs (the ARCHS above get the full battery). Each
# config class with its own arguments; the rest are SMALL's where the class takes them.
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
BREADTH = {
    "LlamaConfig": dict(num_key_value_heads=2),
    "Qwen3Config": dict(num_key_value_heads=2, head_dim=16),        # q/k RMSNorms
    "Phi3Config": dict(num_key_value_heads=2),
    "Olmo2Config": dict(num_key_value_heads=2),                     # RMSNorms in float32, q/k norms
    "GraniteConfig": dict(num_key_value_heads=2),
    "Starcoder2Config": dict(num_key_value_heads=2),               # LayerNorms with biases
    "GPTNeoXConfig": dict(),
    "FalconConfig": dict(new_decoder_architecture=True, num_kv_heads=2),
    "PhiConfig": dict(),
    "StableLmConfig": dict(num_key_value_heads=2),
    "GemmaConfig": dict(num_key_value_heads=2, head_dim=16),        # 1 + weight RMSNorms
    "Glm4Config": dict(num_key_value_heads=2, head_dim=16),
    "Exaone4Config": dict(num_key_value_heads=2),
    "SmolLM3Config": dict(num_key_value_heads=2),
    "OPTConfig": dict(ffn_dim=128, word_embed_proj_dim=64),
    "GPTJConfig": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "BioGptConfig": dict(),
    "PersimmonConfig": dict(),
    "Cohere2Config": dict(num_key_value_heads=2, layer_types=["sliding_attention", "full_attention"],
                          sliding_window=WINDOW),
    "NemotronConfig": dict(num_key_value_heads=2),                  # LayerNorms of 1 + weight
}


@pytest.mark.parametrize("config_name", BREADTH)
def test_patch_serves_decoder_families(config_name):
    """patch on each family: attention in every layer served, every norm swapped (Nemotron's
    `1 + weight` LayerNorm as lmfast.nn.LayerNorm1P), float32 logits of a padded batch within budget."""
    import inspect

    config_class = getattr(transformers, config_name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    takes = inspect.signature(config_class).parameters
    kwargs = {k: v for k, v in SMALL.items() if k in takes or "kwargs" in takes} | BREADTH[config_name]
    if config_name == "GPTJConfig":
        kwargs = {"vocab_size": VOCAB} | BREADTH[config_name]
    config = config_class(**kwargs)
    config.pad_token_id = 0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _skip_where_this_transformers_cannot_switch_attention(model)
    ids, mask = _batch()
    keep = mask.bool()
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(ids, attention_mask=mask).logits
        eager = model(ids, attention_mask=mask).logits
        report = lmfast.patch(model)
        got = model(ids, attention_mask=mask).logits
    attention = [n for kind, n in report.swapped.items() if kind.startswith("attention")]
    assert attention == [2], report
    assert not report.skipped and len(report.swapped) >= 2, report
    if config_name == "NemotronConfig":
        served = report.swapped.get("LayerNorm, 1 + weight (NemotronLayerNorm1P)", 0)
        assert served == 2 * config.num_hidden_layers + 1, report
    assert_within_budget(got[keep], ref64[keep], eager[keep], f"{config_name} logits")


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_decoder_training_step(arch):
    """One training step's gradients, patched, within budget of the unpatched float32 model's."""
    ids, mask = _batch(arch)
    keep = mask.bool()
    weights = torch.randn(3, 16, VOCAB, generator=torch.Generator().manual_seed(2))

    def grads(model):
        model.train()
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        (logits * weights.to(logits.dtype))[keep].sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref64 = grads(_hf_model(arch).double())
    model = _hf_model(arch)
    eager = grads(model)
    lmfast.patch(model)
    got = grads(model)
    assert got.keys() == eager.keys()
    for name in got:
        assert_within_budget(got[name], ref64[name], eager[name], f"{arch} grad of {name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_decoder_under_autocast(arch):
    """A float32 model run under torch.autocast(bfloat16), as mixed-precision training runs it:
    the patched model's logits and one training step's gradients within budget of the unpatched
    model's under the same autocast (both against the float64 model). The rotary models hand
    attention a float32 q and k beside a bfloat16 v, which SDPA's autocast rule casts, and
    lmfast's now does too (before, it refused them)."""
    ids, mask = _batch(arch)
    keep = mask.bool()
    weights = torch.randn(3, 16, VOCAB, generator=torch.Generator().manual_seed(2))

    def run(model, autocast=True):
        model.train()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids, attention_mask=mask).logits
        (logits.to(weights.dtype) * weights)[keep].sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref64, grads64 = run(_hf_model(arch).double(), autocast=False)
    model = _hf_model(arch)
    eager, eager_grads = run(model)
    lmfast.patch(model)
    got, grads = run(model)
    assert got.dtype == eager.dtype == torch.bfloat16
    assert_within_budget(got[keep], ref64[keep], eager[keep], f"{arch} logits under autocast")
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        assert_within_budget(grads[name], grads64[name], eager_grads[name], f"{arch} grad of {name} under autocast")


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_decoder_generation_with_kv_cache(arch, monkeypatch):
    """Greedy generate() on a left-padded batch: the same tokens patched and not. For Mistral
    the 16 + 12 tokens run past the 6-token window, so the sliding cache drops keys."""
    model = _hf_model(arch)
    ids, kwargs = _generation_inputs(max_new_tokens=12)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        lmfast.patch(model)
        calls = _spy_attention(monkeypatch)
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert len(calls) == 2 * 12  # each layer, prefill and 11 decode steps
    # prefill: causal with a (B, 1, 1, Sk) padding mask; decoding (Sq = 1): that padding mask,
    # or none once Mistral's sliding cache holds no padded key
    assert all(c["causal"] for c in calls[:2])
    assert all(c["mask"] is None or c["mask"][:3] == (3, 1, 1) for c in calls)
    assert [c["window"] for c in calls] == _windows(arch) * 12


def _gpt_oss():
    """A small gpt-oss (attention sinks, a sliding and a global layer, experts) with sinks drawn
    at random (they start at zero), its experts computed by transformers' eager loop (its
    grouped_mm has no float64, which the reference needs)."""
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "sinks"):
                m.sinks.normal_(std=2.0)
    return model


def test_gpt_oss_attention_sinks(monkeypatch):
    """gpt-oss's attention sinks (s_aux) are served: float32 and bfloat16 logits and a training
    step's gradients (the sinks' included) within budget of the unpatched model's (its eager
    attention, which appends the sink as a key) against float64, and greedy generation with a
    KV cache on a left-padded batch unchanged."""
    ids, mask = _batch()
    keep = mask.bool()
    model = _gpt_oss()
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(ids, attention_mask=mask).logits
        for dtype in (torch.float32, torch.bfloat16):
            twin = copy.deepcopy(model).to(dtype)
            eager = twin(ids, attention_mask=mask).logits
            report = lmfast.patch(twin)
            got = twin(ids, attention_mask=mask).logits
            assert report.swapped["attention (attn_implementation 'eager' -> 'lmfast')"] == 2 and not report.skipped
            assert_within_budget(got[keep], ref64[keep], eager[keep], f"gpt-oss {dtype} logits")
    weights = torch.randn(3, 16, VOCAB, generator=torch.Generator().manual_seed(2))

    def grads(m):
        m.zero_grad()
        (m(ids, attention_mask=mask).logits * weights.to(m.dtype))[keep].sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    grads64 = grads(copy.deepcopy(model).double())
    eager = grads(model)
    gen_ids, gen_kwargs = _generation_inputs(max_new_tokens=10)
    with torch.no_grad():
        want = model.generate(gen_ids, **gen_kwargs)
    lmfast.patch(model)
    calls = _spy_attention(monkeypatch)
    got = grads(model)
    assert any(name.endswith("sinks") for name in got) and got.keys() == eager.keys()
    for name in got:
        assert_within_budget(got[name], grads64[name], eager[name], f"gpt-oss grad of {name}")
    with torch.no_grad():
        assert torch.equal(model.generate(gen_ids, **gen_kwargs), want)
    assert [c["window"] for c in calls[:2]] == [WINDOW, None]


def _t5():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_t5_norms_and_position_bias_attention(dtype, monkeypatch):
    """T5 (encoder-decoder, relative position bias): its T5LayerNorms, RMSNorms by another name
    that round to a 16-bit weight's dtype, are swapped (T5's casting); its attention runs lmfast's
    kernel with the position bias as the additive mask, the padding folded in (-inf), the
    decoder's causal band as `causal` (it ran transformers' SDPA path before). Logits within
    budget on a padded batch."""
    model = _t5()
    _skip_where_this_transformers_cannot_switch_attention(model)
    ids, mask = _batch()
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :7].flip(0))
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(**inputs).logits
        model.to(dtype)
        eager = model(**inputs).logits
        report = lmfast.patch(model)
        calls = _spy_attention(monkeypatch)
        got = model(**inputs).logits
    assert report.swapped["RMSNorm, T5's casting (T5LayerNorm)"] == 2 * 2 + 3 * 2 + 2 and not report.skipped
    assert_within_budget(got, ref64, eager, "T5 logits")
    # encoder self-attention: bias + padding; decoder self-attention: the bias (one for the
    # batch) and causal; cross-attention: the (zero) bias + the encoder's padding
    encoder, decoder_self, cross = ((3, 4, 16, 16), False), ((1, 4, 7, 7), True), ((3, 4, 7, 16), False)
    assert [(c["mask"], c["causal"]) for c in calls] == [encoder] * 2 + [decoder_self, cross] * 2


def test_layers_reading_a_config_that_keeps_another_attention_are_reported_not_counted(monkeypatch):
    """transformers 5.17's set_attn_implementation switched T5's own config but not the copies
    its encoder and decoder stacks hold, which their layers read: patch counted 6 attention
    layers swapped while all 6 ran SDPA as before. It reports them now (that transformers is
    mimicked here: the model's config alone is switched)."""
    model = _t5()
    monkeypatch.setattr(type(model), "set_attn_implementation",
                        lambda self, name: setattr(self.config, "_attn_implementation", name))
    report = lmfast.patch(model)
    assert model.config._attn_implementation == "lmfast" and model.encoder.config._attn_implementation != "lmfast"
    assert not [kind for kind in report.swapped if kind.startswith("attention")], report
    assert any("6 of T5ForConditionalGeneration's attention layers read a config of their own" in why
               for _, why in report.skipped), report


def test_t5_training_step_and_generation():
    """The gradient of T5's learned position bias goes through the kernels' mask gradient: each
    layer's relative_attention_bias and the other parameters within budget of the float64
    model's; greedy generation (a KV cache, one query row a step) unchanged."""
    ids, mask = _batch()
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :7].flip(0))
    weights = torch.randn(3, 7, VOCAB, generator=torch.Generator().manual_seed(2))

    def grads(model):
        model.train()
        model.zero_grad()
        (model(**inputs).logits * weights.to(model.dtype)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref64, eager = grads(_t5().double()), grads(_t5())
    model = _t5()
    lmfast.patch(model)
    got = grads(model)
    assert got.keys() == eager.keys() and any("relative_attention_bias" in n for n in got)
    for name in got:
        assert_within_budget(got[name], ref64[name], eager[name], f"T5 gradient of {name}")
    model.eval()
    want = _t5().generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False), want)


def test_save_pretrained_then_from_pretrained_with_attn_implementation_lmfast(tmp_path):
    """save_pretrained of a patched model writes the original checkpoint; loading it with
    attn_implementation="lmfast" needs no lmfast.patch call (`import lmfast` registered it)."""
    model = _hf_model("qwen2")
    lmfast.patch(model)
    model.save_pretrained(tmp_path)  # from the patched model: same keys and tensors, no lmfast in the config
    assert "lmfast" not in (tmp_path / "config.json").read_text()
    lmfast.unpatch(model)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="lmfast").eval()
    assert loaded.config._attn_implementation == "lmfast"
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    ids, mask = _batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        ref64 = model.double()(ids, attention_mask=mask).logits
        got = loaded(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_within_budget(got[keep], ref64[keep], want[keep], "from_pretrained(attn_implementation='lmfast')")


def test_import_lmfast_registers_with_transformers_when_it_loads():
    """In a fresh interpreter: `import lmfast` leaves transformers' modeling code unloaded (it
    costs seconds), and registers "lmfast" as soon as the program loads it."""
    code = ("import sys, lmfast; assert 'transformers.modeling_utils' not in sys.modules; "
            "from transformers import AutoModel; from transformers.modeling_utils import AttentionInterface; "
            "from transformers.masking_utils import AttentionMaskInterface; "
            "assert 'lmfast' in AttentionInterface._global_mapping, 'attention'; "
            "assert 'lmfast' in AttentionMaskInterface._global_mapping, 'mask'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   cwd=tempfile.gettempdir())  # (not the checkout's lmfast, which `python -c` would import)


def test_mask_structure_is_exact_or_absent():
    """The mask function notes a structure only where the mask equals it: top-left causal
    (a prefill into a static cache, Sq < Sk) keeps the full mask, with causal=True (it keeps
    nothing above the bottom-right diagonal); a prefix-LM mask keeps the full mask alone."""
    from transformers.masking_utils import causal_mask_function

    from lmfast.integrations import hf

    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[0, :2] = False
    bottom_right = hf._mask(2, 5, 8, q_offset=3, kv_offset=0, mask_function=causal_mask_function,
                            attention_mask=padding)
    assert getattr(bottom_right, "_lmfast_structure").causal
    assert bottom_right._lmfast_structure.padding.shape == (2, 1, 1, 8)
    static = hf._mask(2, 5, 8, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                      attention_mask=padding[:, :5])  # top-left: keys 5.. are empty cache slots
    assert static._lmfast_structure.causal and static._lmfast_structure.full_mask

    def prefix_lm(batch_idx, head_idx, q_idx, kv_idx):  # the first 3 tokens see each other
        return (kv_idx <= q_idx) | (kv_idx < 3)
    prefix = hf._mask(1, 6, 6, mask_function=prefix_lm)
    assert getattr(prefix, "_lmfast_structure", None) is None

    def documents(starts):  # causal documents side by side, as transformers packs them
        doc = torch.tensor([sum(i >= s for s in starts) for i in range(8)])
        return lambda batch_idx, head_idx, q_idx, kv_idx: (kv_idx <= q_idx) & (doc[q_idx] == doc[kv_idx])
    # (transformers passes allow_is_causal_skip=False with packed sequences: the skip does not read the function)
    packed = hf._mask(1, 8, 8, mask_function=documents([3, 4]), allow_is_causal_skip=False)
    assert packed._lmfast_structure.documents.tolist() == [0, 3, 4, 8] and packed._lmfast_structure.causal
    not_quite = hf._mask(1, 8, 8, mask_function=lambda b, h, q, kv: documents([3, 4])(b, h, q, kv) & (kv != 6),
                         allow_is_causal_skip=False)
    assert not_quite._lmfast_structure.documents is None and not_quite._lmfast_structure.full_mask
    # an in-place edit voids the noted structure
    bottom_right[0, 0, 0, 0] = True
    s = bottom_right._lmfast_structure
    assert s.version != bottom_right._version


def test_packed_sequences(monkeypatch):
    """Padding-free batches (transformers' DataCollatorWithFlattening: documents side by side in
    one row, position_ids restarting at each; no cache, as in training): transformers builds a
    block-diagonal causal mask; lmfast's mask function finds the documents in it, and the kernel
    takes their boundaries (cu_seqlens) in place of the mask, with causal=True, and computes
    what the unpatched model does, logits and gradients. (The documents here are shorter than a
    kernel tile; test_attention_kernels' test_packed_documents runs documents that span tiles.)"""
    model = _hf_model("qwen2").train()
    lengths = [5, 9, 2]
    ids = torch.randint(1, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    ref64 = copy.deepcopy(model).double()
    eager = model(ids, position_ids=position_ids, use_cache=False).logits
    patched = copy.deepcopy(model)
    lmfast.patch(patched)
    calls = _spy_attention(monkeypatch)
    got = patched(ids, position_ids=position_ids, use_cache=False).logits
    assert calls and all(c["mask"] is None and c["causal"] and c["documents"] == [0, 5, 14, 16] for c in calls), calls
    want = ref64(ids, position_ids=position_ids, use_cache=False).logits
    assert_within_budget(got, want, eager, "packed sequences' logits")
    # each document alone gives the same logits as in the pack
    start = 0
    for n in lengths:
        alone = patched(ids[:, start:start + n]).logits
        assert_within_budget(alone, want[:, start:start + n], eager[:, start:start + n], f"document of {n} alone")
        start += n
    # and the gradients of every parameter
    grads = {}
    for name, m in (("got", patched), ("want", ref64), ("eager", model)):
        m.zero_grad()
        m(ids, position_ids=position_ids, use_cache=False).logits.float().pow(2).mean().backward()
        grads[name] = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    assert grads["got"].keys() == grads["want"].keys()
    for k in grads["want"]:
        assert_within_budget(grads["got"][k], grads["want"][k], grads["eager"][k], f"packed sequences: grad {k}")


def test_patched_hf_model_under_torch_compile(monkeypatch):
    model = _hf_model("qwen2")
    ids, mask = _batch()
    keep = mask.bool()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        ref64 = copy.deepcopy(model).double()(ids, attention_mask=mask).logits
        lmfast.patch(model)
        calls = _spy_attention(monkeypatch)
        compiled = torch.compile(model)  # inductor, as a user would (~20 s here)
        got = compiled(ids, attention_mask=mask).logits
    assert calls  # lmfast attention was traced into the graph
    assert_within_budget(got[keep], ref64[keep], eager[keep], "compiled patched qwen2 logits")


# ---- torch.nn.Transformer / TransformerEncoder ------------------------------------------------

D_MODEL, HEADS = 32, 4


def _torch_transformer(batch_first: bool, dropout: float = 0.0):
    torch.manual_seed(0)
    return torch.nn.Transformer(D_MODEL, HEADS, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                                dropout=dropout, batch_first=batch_first).eval()


def _seq2seq_inputs(batch_first: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randn(3, 11, D_MODEL, generator=g), torch.randn(3, 7, D_MODEL, generator=g)
    src_pad = torch.zeros(3, 11, dtype=torch.bool)
    src_pad[0, -4:] = True  # True = padding, torch's convention
    tgt_pad = torch.zeros(3, 7, dtype=torch.bool)
    tgt_pad[2, -2:] = True
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    return dict(src=src.to(dtype), tgt=tgt.to(dtype), tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(7),
                tgt_is_causal=True, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                memory_key_padding_mask=src_pad)


def _as_rows(out, batch_first):
    return out if batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_torch_transformer_encoder_decoder(batch_first, dtype, monkeypatch):
    model = _torch_transformer(batch_first)
    inputs = _seq2seq_inputs(batch_first)
    keep = ~inputs["tgt_key_padding_mask"]
    with torch.no_grad():
        ref64 = _as_rows(copy.deepcopy(model).double()(**{k: v.double() if v.is_floating_point() else v
                                                         for k, v in inputs.items() if torch.is_tensor(v)},
                                                      tgt_is_causal=True), batch_first)
        model.to(dtype)
        inputs = _seq2seq_inputs(batch_first, dtype)
        inputs["tgt_mask"] = inputs["tgt_mask"].to(dtype)
        eager = _as_rows(model(**inputs), batch_first)
        report = lmfast.patch(model)
        calls = _spy_attention(monkeypatch)
        got = _as_rows(model(**inputs), batch_first)
    assert report.swapped == {"LayerNorm (LayerNorm)": 12, "MultiheadAttention (MultiheadAttention)": 6}
    assert_within_budget(got[keep], ref64[keep], eager[keep], "nn.Transformer output")
    # encoder self-attention: padding only; decoder self-attention: causal + padding; cross: padding
    assert calls == ([{"mask": (3, 1, 1, 11), "causal": False, "window": None}] * 2
                     + [{"mask": (3, 1, 1, 7), "causal": True, "window": None},
                        {"mask": (3, 1, 1, 11), "causal": False, "window": None}] * 2)
    lmfast.unpatch(model)
    assert not any(isinstance(m, (lmfast.nn.MultiheadAttention, lmfast.nn.LayerNorm)) for m in model.modules())


def test_torch_transformer_under_autocast():
    """nn.Transformer (float32) under torch.autocast(bfloat16): the patched output, its dtype,
    and one training step's gradients, within budget of the unpatched model's under the same
    autocast (both against the float64 model)."""
    model = _torch_transformer(batch_first=True)
    inputs = _seq2seq_inputs(True)
    keep = ~inputs["tgt_key_padding_mask"]
    weights = torch.randn(3, 7, D_MODEL, generator=torch.Generator().manual_seed(4))

    def run(m, autocast=True):
        m.train()  # (dropout 0: the same function as in eval, through the modules, with gradients)
        m.zero_grad()
        x = {k: v.double() if not autocast and torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in inputs.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(**x)
        (out.to(weights.dtype) * weights)[keep].sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    ref64, grads64 = run(copy.deepcopy(model).double(), autocast=False)
    eager, eager_grads = run(model)
    lmfast.patch(model)
    got, grads = run(model)
    assert got.dtype == eager.dtype
    assert_within_budget(got[keep], ref64[keep], eager[keep], "nn.Transformer output under autocast")
    for name in grads:
        assert_within_budget(grads[name], grads64[name], eager_grads[name], f"nn.Transformer grad of {name} under autocast")


def test_torch_transformer_training_step():
    model = _torch_transformer(batch_first=True)
    inputs = _seq2seq_inputs(True)
    keep = ~inputs["tgt_key_padding_mask"]
    weights = torch.randn(3, 7, D_MODEL, generator=torch.Generator().manual_seed(4))

    def grads(m, dtype=torch.float32):
        m.train()
        m.zero_grad()
        x = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        (m(**x) * weights.to(dtype))[keep].sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ref64 = grads(copy.deepcopy(model).double(), torch.float64)
    eager = grads(model)
    lmfast.patch(model)
    got = grads(model)
    for name in got:
        assert_within_budget(got[name], ref64[name], eager[name], f"nn.Transformer grad of {name}")


def test_torch_encoder_inference_runs_lmfast_not_torchs_fast_path(monkeypatch):
    """In eval under no_grad torch's encoder would take its fused path (nested tensors for the
    padding), bypassing the swapped modules: patch turns that off, unpatch back on."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, 64, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 11, D_MODEL)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[1, -5:] = True
    keep = ~pad
    with torch.no_grad():
        ref64 = copy.deepcopy(encoder).double()(x.double(), src_key_padding_mask=pad)
        eager = encoder(x, src_key_padding_mask=pad)
        report = lmfast.patch(encoder)
        calls = _spy_attention(monkeypatch)
        got = encoder(x, src_key_padding_mask=pad)
    assert "fused inference path is turned off" in str(report)
    assert len(calls) == 2
    assert_within_budget(got[keep], ref64[keep], eager[keep], "TransformerEncoder output")
    lmfast.unpatch(encoder)
    assert encoder.use_nested_tensor and all(lay.activation_relu_or_gelu == 1 for lay in encoder.layers)


def test_multihead_attention_falls_back_to_torch_where_lmfast_does_not_serve(monkeypatch):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(D_MODEL, HEADS, dropout=0.5, batch_first=True)
    lm = lmfast.nn.MultiheadAttention.from_torch(mha)
    x = torch.randn(2, 5, D_MODEL)
    calls = _spy_attention(monkeypatch)
    out, weights = lm(x, x, x)  # need_weights=True (torch's default): torch's forward, exactly
    assert weights.shape == (2, 5, 5) and not calls
    mha.eval(), lm.eval()
    assert torch.equal(lm(x, x, x, need_weights=True)[0], mha(x, x, x, need_weights=True)[0])
    lm.eval()
    assert lm(x, x, x, need_weights=False)[1] is None and len(calls) == 1
    with pytest.raises(ValueError, match="is_causal=True .* attn_mask is None"):
        lm(x, x, x, need_weights=False, is_causal=True)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        lm(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def test_patch_leaves_unserved_multihead_attention_and_softmax_alone():
    model = torch.nn.ModuleDict({"bias_kv": torch.nn.MultiheadAttention(D_MODEL, HEADS, add_bias_kv=True),
                                 "softmax": torch.nn.Softmax(dim=-1), "legacy": torch.nn.Softmax()})
    report = lmfast.patch(model)
    assert report.swapped == {"Softmax (Softmax)": 1}
    assert {p for p, _ in report.skipped} == {"bias_kv", "legacy"}
    assert "add_bias_kv" in str(report) and "dim=None" in str(report)
    x = torch.randn(4, 9) * 3
    assert_within_budget(model["softmax"](x), torch.softmax(x.double(), -1), torch.softmax(x, -1), "softmax")


def test_model_whose_attention_bypasses_the_attention_interface_is_reported_not_counted():
    """Bloom computes attention in its own code: transformers only warns when asked for another
    attn_implementation, so patch reports the attention as left alone (it counted it swapped,
    x0, before), swaps the LayerNorms, and the model computes what it did."""
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids, mask = _batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        report = lmfast.patch(model)
        got = model(ids, attention_mask=mask).logits
    assert report.swapped == {"LayerNorm (LayerNorm)": 2 * 2 + 2}, report
    assert [p for p, _ in report.skipped] == [""] and "BloomForCausalLM computes attention in its own code" in str(report)
    assert model.config._attn_implementation != "lmfast"
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert lmfast.unpatch(model) == 6


MASKS = ["none", "bool", "float", "bool+padding", "float+padding", "per-head"]


@pytest.mark.parametrize("kdim", [None, 24], ids=["self", "kdim24"])
@pytest.mark.parametrize("layout, masks", [(layout, m) for layout in ("batch_first", "seq_first") for m in MASKS]
                         + [("unbatched", m) for m in ("none", "bool", "float")])  # (no batch: no padding)
def test_multihead_attention_matches_torch(layout, kdim, masks):
    """lmfast.nn.MultiheadAttention.from_torch against torch's module: outputs and the
    gradients of the inputs and of every parameter, within the error budget."""
    torch.manual_seed(0)
    E, L, S, B = D_MODEL, 5, 9, 3
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, L, E, generator=g)
    kv = torch.randn(B, S, kdim or E, generator=g)
    kwargs = {}
    if masks != "none":
        scores = torch.randn(L, S, generator=g)
        kind = masks.split("+")[0]  # a boolean True masks, as in torch
        kwargs["attn_mask"] = {"bool": scores > 1, "float": scores,
                               "per-head": torch.randn(B * HEADS, L, S, generator=g)}[kind]
    if "padding" in masks:
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[0, -4:] = True
        kwargs["key_padding_mask"] = pad if masks.startswith("bool") else torch.zeros(B, S).masked_fill(pad, -1e9)
    if layout == "seq_first":
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    elif layout == "unbatched":
        q, kv = q[0], kv[0]

    def run(module, dtype):
        qq = q.to(dtype).requires_grad_()
        kk = kv.to(dtype).requires_grad_()
        kw = {n: m.to(dtype) if m.is_floating_point() else m for n, m in kwargs.items()}
        out = module(qq, kk, kk, need_weights=False, **kw)[0]
        out.backward(torch.ones_like(out))
        return [out, qq.grad, kk.grad] + [p.grad for p in module.parameters()]

    torch_mha = torch.nn.MultiheadAttention(E, HEADS, kdim=kdim, vdim=kdim, batch_first=layout == "batch_first")
    ref64 = run(copy.deepcopy(torch_mha).double(), torch.float64)
    eager = run(copy.deepcopy(torch_mha), torch.float32)
    got = run(lmfast.nn.MultiheadAttention.from_torch(torch_mha), torch.float32)
    for name, a, r, e in zip(["output", "d query", "d key/value"] + [n for n, _ in torch_mha.named_parameters()],
                             got, ref64, eager):
        assert_within_budget(a, r, e, f"MultiheadAttention {name}")


def test_multihead_attention_dropout_in_training_runs_in_lmfast(monkeypatch):
    """nn.Transformer*'s default attention dropout (0.1): in training lmfast's kernel drops
    (a fresh mask per call; torch.manual_seed repeats it), in eval it does not; averaged over
    many calls the training output is the eval output (dropout scales by 1 / (1 - p))."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(D_MODEL, HEADS, dropout=0.5, batch_first=True)
    lm = lmfast.nn.MultiheadAttention.from_torch(mha)
    x = torch.randn(2, 5, D_MODEL)
    calls = _spy_attention(monkeypatch)
    lm.train()
    torch.manual_seed(1)
    a = lm(x, x, x, need_weights=False)[0]
    torch.manual_seed(1)
    assert torch.equal(lm(x, x, x, need_weights=False)[0], a)
    assert not torch.equal(lm(x, x, x, need_weights=False)[0], a)
    assert [c.get("dropout_p") for c in calls] == [0.5] * 3
    with torch.no_grad():
        mean = torch.stack([lm(x, x, x, need_weights=False)[0] for _ in range(2000)]).mean(0)
        lm.eval()
        want = lm(x, x, x, need_weights=False)[0]
    assert "dropout_p" not in calls[-1]
    assert (mean - want).abs().max() < 0.1 * want.abs().max()  # (2000 draws: ~0.02 of noise)


def test_hf_attention_dropout_runs_in_lmfast_attention_in_training(monkeypatch):
    """GPT-2's attention dropout: in training lmfast attention runs with it (a new mask each
    call, the same one after torch.manual_seed, gradients through it), in eval without it."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    lmfast.patch(model)
    calls = _spy_attention(monkeypatch)
    ids, mask = _batch()
    model.train()
    a, b = model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    assert [c["dropout_p"] for c in calls] == [0.5] * 4 and not torch.equal(a, b)
    torch.manual_seed(1)
    c = model(ids, attention_mask=mask).logits
    torch.manual_seed(1)
    c.sum().backward()
    assert torch.equal(model(ids, attention_mask=mask).logits, c)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)
    model.eval()
    calls.clear()
    model(ids, attention_mask=mask)
    assert len(calls) == 2 and not any("dropout_p" in c for c in calls)


def test_gemma3_row_of_the_model_benchmarks(monkeypatch):
    """model_benchmarks' Gemma 3 row at a small shape: its outputs check (the error budget
    against the float64 model) passes, and the timed calls run lmfast's 1 + weight RMSNorm and
    attention (a sliding and a global layer)."""
    from lmfast import model_benchmarks as mb

    model = mb.gemma3_random(torch.float32, num_hidden_layers=2, vocab_size=VOCAB, hidden_size=64,
                             intermediate_size=128, head_dim=16, sliding_window=WINDOW,
                             layer_types=["sliding_attention", "full_attention"])
    reference = mb.gemma3_last_logits(copy.deepcopy(model).double(), 24)
    calls = _spy_attention(monkeypatch)
    result = mb.gemma3_prefill(model, tokens=24, blocks=1, calls=1, reference=reference)
    assert result.agrees and "within the budget" in result.agreement, result.agreement
    assert {c["window"] for c in calls} == {WINDOW, None}


def test_gemma2_logit_softcapping_changes_the_logits_and_is_served():
    """Gemma 2 caps its attention logits (attn_logit_softcapping), which lmfast computes in its
    kernels (ops.attention(softcap=)). The cap of these tests changes the model's logits far past
    the error budget, so the decoder tests above fail if it is dropped; and a model loaded with
    attn_implementation="lmfast" runs it too (it raised NotImplementedError before)."""
    model = _hf_model("gemma2")
    ids, mask = _batch()
    keep = mask.bool()
    uncapped = copy.deepcopy(model)
    for m in uncapped.modules():
        if hasattr(m, "attn_logit_softcapping"):
            m.attn_logit_softcapping = None
    direct = transformers.AutoModelForCausalLM.from_config(model.config, attn_implementation="lmfast").eval()
    direct.load_state_dict(model.state_dict())
    lmfast.patch(direct)  # (its norms: the attention is lmfast's already)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        without_cap = uncapped(ids, attention_mask=mask).logits
        lmfast.patch(model)
        got = model(ids, attention_mask=mask).logits
        loaded = direct(ids, attention_mask=mask).logits
    assert (without_cap - want)[keep].abs().max() > 1000 * (got - want)[keep].abs().max()
    torch.testing.assert_close(loaded, got, rtol=0, atol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_projects_shared_inputs_once(batch_first, monkeypatch):
    """Self-attention takes one input projection matmul, cross-attention with key is value two,
    in either layout (the sequence-first transposes must not hide that q, k, v are one tensor)."""
    lm = lmfast.nn.MultiheadAttention(D_MODEL, HEADS, batch_first=batch_first)
    x, memory = torch.randn(2, 5, D_MODEL), torch.randn(2, 7, D_MODEL)  # (B, S, E)
    if not batch_first:
        x, memory = x.transpose(0, 1), memory.transpose(0, 1)  # (S, B, E)
    linear, calls = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    lm(x, x, x, need_weights=False)
    assert len(calls) == 2  # q/k/v together, then out_proj
    calls.clear()
    lm(x, memory, memory, need_weights=False)
    assert len(calls) == 3  # q, k/v together, out_proj


# ---- calls lmfast attention does not compute, and compiled generation (issue 11) -----------------

@pytest.mark.parametrize("arch", ARCHS)
def test_output_attentions_returns_the_eager_attention_weights(arch, caplog, monkeypatch):
    """Regression: with output_attentions=True a patched model returned an empty `attentions`
    tuple. Such a call must get the weights: the model's eager attention computes it (one log
    line says so), with the same mask; the weights keep their autograd graph (retain_grad)."""
    model = _hf_model(arch)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids, mask = _batch()
    with torch.no_grad():
        want = eager(ids, attention_mask=mask, output_attentions=True).attentions
    lmfast.patch(model)
    with caplog.at_level("WARNING", logger="lmfast"):
        out = model(ids, attention_mask=mask, output_attentions=True)
        model(ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == len(want) == 2
    for got, ref in zip(out.attentions, want):
        torch.testing.assert_close(got, ref)
    said = [r for r in caplog.records if "asked for attention weights" in r.getMessage()]
    assert len(said) <= 1  # once per process (an earlier test may have said it already)
    out.attentions[0].retain_grad()
    out.logits.sum().backward()
    assert out.attentions[0].grad is not None
    calls = _spy_attention(monkeypatch)  # without the request, lmfast attention runs again
    with torch.no_grad():
        assert model(ids, attention_mask=mask).attentions is None
    assert len(calls) == 2


def _deepseek_v3():
    """DeepSeek V3 with multi-head latent attention: q and k heads of 24 (16 + 8 rotary), v heads
    of 16; two dense layers (the float64 reference cannot run the MoE's grouped matmul)."""
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, first_k_dense_replace=2, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_value_head_dim_other_than_the_querys_runs_lmfast_attention(monkeypatch):
    """DeepSeek V3's multi-head latent attention (value heads narrower than the query's) runs
    lmfast's attention: logits and one training step's gradients within budget of the unpatched
    float32 model's, and greedy generation with a KV cache unchanged. (Such calls ran
    transformers' SDPA path before, whose CPU kernel falls back to the unfused math there.)"""
    ids, mask = _batch()
    keep = mask.bool()
    weights = torch.randn(3, 16, VOCAB, generator=torch.Generator().manual_seed(2))

    def run(model):
        model.train()  # (no dropout in this config: train mode changes nothing but the grads kept)
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        (logits * weights.to(logits.dtype))[keep].sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref64, grads64 = run(_deepseek_v3().double())
    model = _deepseek_v3()
    want, eager_grads = run(model)
    lmfast.patch(model)
    calls = _spy_attention(monkeypatch)
    got, grads = run(model)
    assert len(calls) == 2  # one per layer: none went to another path
    assert_within_budget(got[keep], ref64[keep], want[keep], "DeepSeek V3 logits")
    for name in grads:
        assert_within_budget(grads[name], grads64[name], eager_grads[name], f"DeepSeek V3 grad of {name}")

    model = _deepseek_v3()
    gen_ids, kwargs = _generation_inputs(max_new_tokens=6)
    with torch.no_grad():
        want_tokens = model.generate(gen_ids, **kwargs)
        lmfast.patch(model)
        assert torch.equal(model.generate(gen_ids, **kwargs), want_tokens)


def eager_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sinks=None,
                            **kwargs):
    """(The eager attention of _LayerWithSinks, found here as a model's is found in its module.)
    With Inkling 2's per-token `sinks` (B, H, Sq, 1): one more logit per query row, no value."""
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    if sinks is not None:
        weights = torch.softmax(torch.cat([scores, sinks], -1), -1)[..., :-1]
    else:
        weights = torch.softmax(scores, -1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


class _LayerWithSinks(torch.nn.Module):
    is_causal = False


def test_an_attention_argument_lmfast_does_not_know_runs_the_models_eager_attention(caplog, monkeypatch):
    """A keyword argument lmfast does not compute with (Inkling 2's per-token `sinks`; before,
    ignored: a silently wrong output) sends the call to the model's own eager attention, logged
    once; arguments that change nothing (position_ids, varlen bookkeeping) keep lmfast's kernel."""
    from lmfast.integrations import hf

    layer = _LayerWithSinks()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    sinks = torch.randn(2, 4, 5, 1, generator=g)
    hf._say_unknown_once.cache_clear()
    calls = _spy_attention(monkeypatch)
    with caplog.at_level("WARNING", logger="lmfast"):
        out, weights = hf.attention_forward(layer, q, k, v, None, scaling=0.5, sinks=sinks)
        hf.attention_forward(layer, q, k, v, None, scaling=0.5, sinks=sinks)
    want, want_weights = eager_attention_forward(layer, q, k, v, None, scaling=0.5, sinks=sinks)
    assert calls == [] and torch.equal(out, want) and torch.equal(weights, want_weights)
    said = [r.getMessage() for r in caplog.records if "passes the attention function `sinks`" in r.getMessage()]
    assert len(said) == 1 and "_LayerWithSinks" in said[0]
    out, weights = hf.attention_forward(layer, q, k, v, None, scaling=0.5, position_ids=torch.arange(5)[None],
                                        cu_seq_lens_q=None, sinks=None)
    assert len(calls) == 1 and weights is None
    assert_within_budget(out, eager_attention_forward(layer, q.double(), k.double(), v.double(), None, scaling=0.5)[0],
                         eager_attention_forward(layer, q, k, v, None, scaling=0.5)[0], "attention, neutral arguments")


def test_output_attentions_of_a_layer_without_an_eager_function_of_its_own():
    """A layer whose module defines no eager_attention_forward gets lmfast's plain eager one:
    the weights softmax(scale q k^T + mask), grouped-query heads repeated, the causal mask made
    explicit where the mask function left it out (None)."""
    from lmfast.integrations import hf

    layer = torch.nn.Module()  # (its class's module, torch.nn.modules.module, has no eager function)
    layer.is_causal = True
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    out, weights = hf.attention_forward(layer, q, k, v, None, scaling=0.5, output_attentions=True)
    want_o, _ = lmfast.reference.attention(q, k, v, None, True, 0.5)
    torch.testing.assert_close(out, want_o.transpose(1, 2))
    assert weights.shape == (2, 4, 6, 6) and torch.equal(weights.triu(1), torch.zeros_like(weights))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))


def test_attention_under_fullgraph_compile_with_a_mask_noted_outside():
    """Regression: a mask built (and its structure noted) outside the compiled region made the
    traced attention read the mask's _version: "Could not guard on data-dependent expression"."""
    from transformers.masking_utils import causal_mask_function

    from lmfast.integrations import hf

    torch._dynamo.reset()
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[0, :3] = False
    mask = hf._mask(2, 8, 8, q_offset=0, kv_offset=0, mask_function=causal_mask_function, attention_mask=padding)
    assert mask.__dict__.get("_lmfast_structure") is not None
    layer = torch.nn.Module()
    layer.is_causal = True
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    compiled = torch.compile(lambda q, k, v, m: hf.attention_forward(layer, q, k, v, m)[0], fullgraph=True,
                             backend="eager")
    torch.testing.assert_close(compiled(q, k, v, mask), hf.attention_forward(layer, q, k, v, mask)[0])


def test_generate_with_a_fullgraph_compiled_forward():
    """Compiled generation: torch.compile(model.forward, fullgraph=True) during generate(), with
    the dynamic cache and with a static cache (whose masks are built outside the compiled
    forward), gives the unpatched model's tokens."""
    torch._dynamo.reset()
    model = _hf_model("qwen2")
    ids, kwargs = _generation_inputs(max_new_tokens=5)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        lmfast.patch(model)
        model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
        assert torch.equal(model.generate(ids, **kwargs), want)
        assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), want)
