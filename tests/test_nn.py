"""lmfast.nn modules are drop-ins: same constructor, parameters and state_dict keys, same
outputs as the modules they replace."""

import pytest
import torch

import lmfast


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_layer_norm_is_a_drop_in(kwargs, kb):
    ref = torch.nn.LayerNorm(48, **kwargs, device=kb.device)
    if ref.weight is not None:
        torch.nn.init.normal_(ref.weight)
    if ref.bias is not None:
        torch.nn.init.normal_(ref.bias)
    ours = lmfast.nn.LayerNorm(48, **kwargs, device=kb.device, backend=kb.name)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 16, 48, device=kb.device)
    torch.testing.assert_close(ours(x), ref(x))
    # x whose last dim is not normalized_shape: an error, as torch's (without a weight too)
    with pytest.raises((ValueError, RuntimeError), match="normalized_shape|weight must have shape"):
        ref(x[..., :40])
    with pytest.raises(ValueError, match="do not match normalized_shape|weight must have shape"):
        ours(x[..., :40])


def test_layer_norm_multi_dim_normalized_shape(kb):
    ref = torch.nn.LayerNorm((4, 6), device=kb.device)
    torch.nn.init.normal_(ref.weight)
    ours = lmfast.nn.LayerNorm((4, 6), device=kb.device, backend=kb.name)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(16, 4, 6, device=kb.device)
    torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(ValueError, match="do not match normalized_shape"):
        ours(torch.randn(3, 6, 4, device=kb.device))


def test_layer_norm_residual_forward():
    ln = lmfast.nn.LayerNorm(32)
    x, r = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    y, s = ln(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (32,), ln.weight, ln.bias))


def _rms_eps64(module, dtype):
    """The eps torch.nn.RMSNorm uses: its own, else (None) float32's for 16/32-bit x, float64's for float64."""
    return module.eps if module.eps is not None else torch.finfo(torch.promote_types(dtype, torch.float32)).eps


@pytest.mark.parametrize("shape", [(48,), (4, 12)], ids=["1-dim", "2-dim"])
@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-5}, {"elementwise_affine": False}],
                         ids=["eps-None", "eps", "no-weight"])
def test_torch_rms_norm_is_a_drop_in(kwargs, shape, kb, dtype):
    """lmfast.nn.TorchRMSNorm is a torch.nn.RMSNorm (a subclass): same constructor, state_dict
    and attributes, and torch's outputs within budget. Inputs of RMS ~1e-3, so that eps=None
    (float32's machine epsilon, ~1e-7, for 16-bit inputs too) is not lost in the mean square."""
    from lmfast.testing import assert_within_budget

    torch.manual_seed(0)
    ref = torch.nn.RMSNorm(shape, **kwargs, device=kb.device, dtype=dtype)
    if ref.weight is not None:
        torch.nn.init.normal_(ref.weight)
    ours = lmfast.nn.TorchRMSNorm(shape, **kwargs, device=kb.device, dtype=dtype, backend=kb.name)
    assert isinstance(ours, torch.nn.RMSNorm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    assert (ours.normalized_shape, ours.eps, ours.elementwise_affine) == (ref.normalized_shape, ref.eps,
                                                                          ref.elementwise_affine)
    x = (torch.randn(3, 16, *shape, device=kb.device) * 1e-3).to(dtype)
    w64 = None if ref.weight is None else ref.weight.double()
    ref64 = torch.nn.functional.rms_norm(x.double(), shape, w64, _rms_eps64(ref, dtype))
    assert_within_budget(ours(x), ref64, ref(x), "TorchRMSNorm")
    # attributes are read on every call, as torch's are
    ours.eps = ref.eps = 1e-2
    ref64 = torch.nn.functional.rms_norm(x.double(), shape, w64, 1e-2)
    assert_within_budget(ours(x), ref64, ref(x), "TorchRMSNorm after eps = 1e-2")
    with pytest.raises(ValueError, match="do not match normalized_shape|weight must have shape"):
        ours(torch.randn(3, *shape[::-1], 5, device=kb.device, dtype=dtype))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["x-bf16", "w-bf16"])
def test_torch_rms_norm_mixed_dtypes_and_residual(x_dtype, w_dtype):
    """Mixed dtypes as torch's (computed in float32, returned in x's dtype, rounded once); the
    fused residual returns (norm(x + r), x + r)."""
    torch.manual_seed(0)
    ref = torch.nn.RMSNorm(32, dtype=w_dtype)
    torch.nn.init.normal_(ref.weight)
    ours = lmfast.nn.TorchRMSNorm(32, dtype=w_dtype)
    ours.load_state_dict(ref.state_dict())
    x, r = torch.randn(16, 32, dtype=x_dtype), torch.randn(16, 32, dtype=x_dtype)
    want, got = ref(x), ours(x)
    assert got.dtype == want.dtype == x_dtype
    torch.testing.assert_close(got, want, rtol=2 ** -8, atol=2 ** -8)
    y, s = ours(x, r)
    assert torch.equal(s, x + r)
    torch.testing.assert_close(y, ref(x + r), rtol=2 ** -8, atol=2 ** -8)


def _llama_rms_norm():
    """transformers' own LlamaRMSNorm (a test extra; the offline GPU runner may lack it)."""
    return pytest.importorskip("transformers.models.llama.modeling_llama",
                               reason="transformers is not installed").LlamaRMSNorm


def test_rms_norm_matches_hugging_face_module(kb):
    ref = _llama_rms_norm()(64, eps=1e-5).to(kb.device)
    torch.nn.init.normal_(ref.weight)
    ours = lmfast.nn.RMSNorm(64, eps=1e-5, device=kb.device, backend=kb.name)
    assert ours.state_dict().keys() == ref.state_dict().keys() == {"weight"}
    ours.load_state_dict(ref.state_dict())
    assert ours.variance_epsilon == ours.eps == 1e-5
    x = torch.randn(2, 16, 64, device=kb.device)
    torch.testing.assert_close(ours(x), ref(x))


def test_rms_norm_mixed_dtypes_follow_hugging_face_promotion():
    ref, ours = _llama_rms_norm()(32), lmfast.nn.RMSNorm(32)
    torch.nn.init.normal_(ref.weight)
    ours.load_state_dict(ref.state_dict())  # float32 weight
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    want, got = ref(x), ours(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)


def _gemma_rms_norm():
    return pytest.importorskip("transformers.models.gemma.modeling_gemma",
                               reason="transformers is not installed").GemmaRMSNorm


def test_weight_offset_rms_norm_is_gemmas(kb):
    """weight_offset=1: GemmaRMSNorm's state_dict, zero initial weight and 1 + weight scale; a
    -0.5 weight halves the output, so the offset is neither dropped nor doubled."""
    ref = _gemma_rms_norm()(64, eps=1e-6).to(kb.device)
    ours = lmfast.nn.RMSNorm(64, eps=1e-6, weight_offset=1.0, device=kb.device, backend=kb.name)
    assert ours.state_dict().keys() == ref.state_dict().keys() == {"weight"}
    assert torch.equal(ours.weight, ref.weight) and not ours.weight.any()  # zeros: the scale starts at 1
    assert "weight_offset=1.0" in repr(ours)
    torch.nn.init.normal_(ref.weight, std=0.2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 64, device=kb.device)
    torch.testing.assert_close(ours(x), ref(x))
    with torch.no_grad():
        ours.weight.fill_(-0.5)
    torch.testing.assert_close(ours(x), 0.5 * lmfast.nn.RMSNorm(64, eps=1e-6).to(kb.device)(x))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16)], ids=["x-bf16", "w-bf16", "both-bf16"])
def test_weight_offset_rms_norm_dtypes_follow_gemma(x_dtype, w_dtype):
    """Gemma's output has x's dtype whatever the weight's, computed in float32 and rounded once."""
    ref = _gemma_rms_norm()(32).to(w_dtype)
    torch.nn.init.normal_(ref.weight, std=0.2)
    ours = lmfast.nn.RMSNorm(32, weight_offset=1.0, dtype=w_dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(16, 32, dtype=x_dtype)
    want, got = ref(x), ours(x)
    assert got.dtype == want.dtype == x_dtype
    torch.testing.assert_close(got, want, atol=0, rtol=2 ** -7 if x_dtype == torch.bfloat16 else 1e-6)
    y, s = ours(x, x)  # with a residual: the sum in x's dtype, as eager's add
    assert torch.equal(s, x + x) and y.dtype == x_dtype
    torch.testing.assert_close(y, ref(x + x), atol=0, rtol=2 ** -7 if x_dtype == torch.bfloat16 else 1e-6)


def test_rms_norm_casting_for_mixed_dtypes():
    """casting: "llama" returns weight * (the normalized x in x's dtype), the promoted dtype;
    "float32" computes in float32 and returns x's dtype, rounded once (OLMo 2's, Gemma's); "t5"
    multiplies the float32 normalized x, rounded to a 16-bit weight's dtype, by the weight (T5's).
    With a residual, the same of x + residual, and x + residual in x's dtype."""
    x, w = torch.randn(8, 32, dtype=torch.bfloat16), torch.rand(32) + 0.5  # a float32 weight
    r = torch.randn(8, 32, dtype=torch.bfloat16)

    def normed(t):
        return t.float() * torch.rsqrt(t.float().square().mean(-1, keepdim=True) + 1e-6)

    for casting, want in (("llama", lambda t, w: w * normed(t).to(t.dtype)),
                          ("float32", lambda t, w: (w * normed(t)).to(t.dtype)),
                          ("t5", lambda t, w: w * (normed(t).to(w.dtype) if w.dtype == torch.bfloat16 else normed(t)))):
        for x_, w_ in ((x, w), (x.float(), w.bfloat16())):
            norm = lmfast.nn.RMSNorm(32, casting=casting, dtype=w_.dtype)
            with torch.no_grad():
                norm.weight.copy_(w_)
            got, expected = norm(x_), want(x_, w_)
            assert got.dtype == expected.dtype and f"casting={casting!r}" in repr(norm), casting
            torch.testing.assert_close(got, expected, rtol=2 ** -8, atol=0)
            y, s = norm(x_, r.to(x_.dtype))
            assert torch.equal(s, x_ + r.to(x_.dtype)) and y.dtype == expected.dtype
            torch.testing.assert_close(y, want(s, w_), rtol=2 ** -8, atol=0)
    assert lmfast.nn.RMSNorm(32).casting == "llama" and lmfast.nn.RMSNorm(32, weight_offset=1.0).casting == "float32"
    with pytest.raises(ValueError, match="casting must be one of"):
        lmfast.nn.RMSNorm(32, casting="gemma")


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16)], ids=["x-bf16", "w-bf16", "both-bf16"])
def test_hf_layer_norm_is_coheres(x_dtype, w_dtype, kb):
    """HFLayerNorm against Cohere's LayerNorm: state_dict, eps under both names, output in x's
    dtype, computed in float32 and rounded once, for every mix of dtypes on every backend,
    within the error budget of Cohere's module against its float64 self; with a residual, the
    sum in x's dtype; bias=True adds a bias, applied the same way (against F.layer_norm)."""
    import copy

    import torch.nn.functional as F

    from lmfast.testing import assert_within_budget

    cohere = pytest.importorskip("transformers.models.cohere.modeling_cohere", reason="transformers is not installed")
    ref = cohere.CohereLayerNorm(32, eps=1e-5).to(kb.device, w_dtype)
    torch.nn.init.normal_(ref.weight)
    ours = lmfast.nn.HFLayerNorm(32, eps=1e-5, device=kb.device, dtype=w_dtype, backend=kb.name)
    assert ours.state_dict().keys() == ref.state_dict().keys() == {"weight"}
    ours.load_state_dict(ref.state_dict())
    ours.eps = 1e-4
    assert ours.variance_epsilon == 1e-4 and "eps=0.0001" in repr(ours)
    ref.variance_epsilon = 1e-4
    ref64 = copy.deepcopy(ref).double()
    x = (torch.randn(16, 32) * 3 + 1).to(kb.device, x_dtype)
    want, got = ref(x), ours(x)
    assert got.dtype == want.dtype == x_dtype
    assert_within_budget(got, ref64(x.double()), want, f"HFLayerNorm {x_dtype} x, {w_dtype} weight")
    y, s = ours(x, x)
    assert torch.equal(s, x + x) and y.dtype == x_dtype
    assert_within_budget(y, ref64((x + x).double()), ref(x + x), "HFLayerNorm with a residual")
    biased = lmfast.nn.HFLayerNorm(32, bias=True, device=kb.device, backend=kb.name)
    with torch.no_grad():
        biased.bias.uniform_(-1, 1)
    assert biased.state_dict().keys() == {"weight", "bias"}
    xf = x.float()
    assert_within_budget(biased(xf), F.layer_norm(xf.double(), (32,), None, biased.bias.double(), 1e-5),
                         F.layer_norm(xf, (32,), None, biased.bias, 1e-5), "HFLayerNorm with a bias")


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "x-bf16"])
def test_layer_norm_1p_is_nemotrons(x_dtype, w_dtype, kb):
    """LayerNorm1P against Nemotron's NemotronLayerNorm1P (scale 1 + weight, added in the
    weight's dtype): state_dict, output dtype, values within the error budget of Nemotron's module
    against its float64 self, and the gradients of x, weight and bias; with a residual, the sum;
    under CPU autocast, left alone as Nemotron's is (it asks about CUDA autocast only)."""
    import copy

    from lmfast.testing import assert_within_budget

    nemotron = pytest.importorskip("transformers.models.nemotron.modeling_nemotron",
                                   reason="transformers is not installed")
    ref = nemotron.NemotronLayerNorm1P(48, eps=1e-5).to(kb.device, w_dtype)
    with torch.no_grad():
        ref.weight.normal_(0, 0.3)  # zero-centered, as trained
        ref.bias.normal_()
    ours = lmfast.nn.LayerNorm1P(48, eps=1e-5, device=kb.device, dtype=w_dtype, backend=kb.name)
    assert ours.state_dict().keys() == ref.state_dict().keys() == {"weight", "bias"}
    ours.load_state_dict(ref.state_dict())
    ref64 = copy.deepcopy(ref).double()
    x = (torch.randn(20, 48) * 3 + 1).to(kb.device, x_dtype).requires_grad_()
    want, got = ref(x), ours(x)
    assert got.dtype == want.dtype
    assert_within_budget(got, ref64(x.double()), want, f"LayerNorm1P {x_dtype} x, {w_dtype} weight")
    dy = torch.randn_like(want)
    x64 = x.detach().double().requires_grad_()
    grads64 = torch.autograd.grad(ref64(x64), (x64, ref64.weight, ref64.bias), dy.double())
    grads = torch.autograd.grad(got, (x, ours.weight, ours.bias), dy)
    grads_eager = torch.autograd.grad(want, (x, ref.weight, ref.bias), dy)
    for name, g, g64, g_eager in zip(("x", "weight", "bias"), grads, grads64, grads_eager):
        assert_within_budget(g, g64, g_eager, f"LayerNorm1P d{name}")
    y, s = ours(x, x)
    assert torch.equal(s, x + x)
    assert_within_budget(y, ref64((x + x).double()), ref(x + x), "LayerNorm1P with a residual")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x), ours(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_patch_serves_nemotrons_layer_norm_1p():
    """lmfast.patch swaps NemotronLayerNorm1P for LayerNorm1P (its probe finds the 1 + weight
    form), sharing its Parameters."""
    nemotron = pytest.importorskip("transformers.models.nemotron.modeling_nemotron",
                                   reason="transformers is not installed")
    model = torch.nn.Sequential(nemotron.NemotronLayerNorm1P(16))
    weight = model[0].weight
    report = lmfast.patch(model)
    assert type(model[0]) is lmfast.nn.LayerNorm1P and model[0].weight is weight, report
    assert report.swapped == {"LayerNorm, 1 + weight (NemotronLayerNorm1P)": 1}, report


def test_norm_modules_read_a_parametrized_weight():
    """The modules read their parameters from _parameters for speed; a parametrized weight
    (torch.nn.utils.parametrize: weight norm, spectral norm...) is not there but a property,
    and is read as one: each module computes with the parametrization's weight."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    x = torch.randn(3, 8)
    for module in (lmfast.nn.LayerNorm(8), lmfast.nn.HFLayerNorm(8), lmfast.nn.RMSNorm(8),
                   lmfast.nn.TorchRMSNorm(8)):
        want = 2 * module(x)
        parametrize.register_parametrization(module, "weight", Doubled())
        assert "weight" not in module._parameters
        torch.testing.assert_close(module(x), want, msg=type(module).__name__)


def test_softmax_module():
    sm = lmfast.nn.Softmax(dim=-1, scale=0.5, causal=True)
    x = torch.randn(2, 3, 16, 16)
    mask = torch.rand(16) > 0.2
    torch.testing.assert_close(sm(x, mask), lmfast.reference.softmax(x, -1, 0.5, mask, True))
    assert "causal=True" in repr(sm)


def test_attention_module(kb):
    attn = lmfast.nn.Attention(causal=True, window=5, backend=kb.name)
    q = torch.randn(2, 4, 9, 16, device=kb.device, requires_grad=True)
    k, v = (torch.randn(2, 2, 12, 16, device=kb.device) for _ in range(2))
    pad = torch.rand(2, 1, 1, 12, device=kb.device) > 0.2
    torch.testing.assert_close(attn(q, k, v, pad), lmfast.reference.attention(q, k, v, pad, True, None, 5)[0])
    attn(q, k, v).sum().backward()
    assert q.grad is not None and list(attn.parameters()) == []
    assert "causal=True, window=5" in repr(attn)


def test_attention_module_dropout_in_training_only(kb):
    attn = lmfast.nn.Attention(causal=True, dropout=0.5, backend=kb.name)
    q, k, v = (torch.randn(1, 2, 9, 16, device=kb.device) for _ in range(3))
    torch.manual_seed(0)
    dropped = attn(q, k, v)
    torch.manual_seed(0)
    seed = torch.randint(1 << 62, (1,), device="cpu" if kb.name == "cpu" else kb.device)  # the seed attn drew
    want = lmfast.reference.attention(q, k, v, None, True, None, None, 0.5, int(seed))[0]
    torch.testing.assert_close(dropped, want)
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), lmfast.reference.attention(q, k, v, None, True)[0])
    assert "dropout=0.5" in repr(attn)


def test_modules_train(kb):
    ln = lmfast.nn.LayerNorm(32, device=kb.device, backend=kb.name)
    rms = lmfast.nn.RMSNorm(32, device=kb.device, backend=kb.name)
    opt = torch.optim.SGD([*ln.parameters(), *rms.parameters()], lr=0.1)
    x = torch.randn(16, 32, device=kb.device)
    rms(ln(x)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*ln.parameters(), *rms.parameters()])
    opt.step()
