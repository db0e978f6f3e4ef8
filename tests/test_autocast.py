"""torch.autocast: lmfast's ops and modules are autocast as the torch ops and modules they stand in for.

Under autocast torch runs SDPA in the autocast dtype (CPU and CUDA alike) and layer_norm,
rms_norm and softmax in float32 on CUDA (as they come on the CPU). Tested here:
- on each kernel backend's device (the CPU here, CUDA on a GPU machine), each op against its
  torch counterpart under autocast: the output dtype, the values within the error budget of
  the float64 result of what autocast hands the kernel, and gradients reaching float32 leaves;
- CUDA's rules on machines without a GPU, through fake CUDA tensors (FakeTensorMode computes
  dtypes and shapes, no data): each lmfast module returns the dtype the module it replaces
  returns under CUDA autocast.
Models patched and run under autocast are in test_patch_models.py.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import lmfast
from lmfast.testing import assert_within_budget

AUTOCAST_DTYPES = pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


def _transformers_module(model: str):
    """transformers.models.<model>.modeling_<model> (a test extra; the offline GPU runner may lack it)."""
    return pytest.importorskip(f"transformers.models.{model}.modeling_{model}", reason="transformers is not installed")


def _randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@AUTOCAST_DTYPES
def test_attention_inputs_of_mixed_dtypes_as_sdpa_casts_them(kb, autocast_dtype):
    """Llama-family models under autocast hand attention a float32 q and k (their rotary embedding
    promotes them) beside a 16-bit v, and a float32 additive mask: SDPA casts all four to the
    autocast dtype, and so does lmfast (it refused them before). Grouped-query heads."""
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 5, 9, 16
    q = _randn(B, Hq, Sq, D, seed=1, device=kb.device).requires_grad_()
    k = _randn(B, Hkv, Sk, D, seed=2, device=kb.device).requires_grad_()
    v = _randn(B, Hkv, Sk, D, seed=3, dtype=autocast_dtype, device=kb.device).requires_grad_()
    mask = _randn(B, 1, Sq, Sk, seed=4, device=kb.device)
    dout = _randn(B, Hq, Sq, D, seed=5, dtype=autocast_dtype, device=kb.device)
    with torch.autocast(kb.device, dtype=autocast_dtype):
        got = lmfast.ops.attention(q, k, v, mask, backend=kb.name)
        eager = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    # float64 of what autocast hands the kernels: the inputs rounded to the autocast dtype
    leaves64 = [t.detach().to(autocast_dtype).double().requires_grad_() for t in (q, k, v)]
    ref64 = F.scaled_dot_product_attention(*leaves64, attn_mask=mask.to(autocast_dtype).double(), enable_gqa=True)
    assert got.dtype == eager.dtype == autocast_dtype
    assert_within_budget(got, ref64, eager, "attention under autocast")
    grads = torch.autograd.grad(got, (q, k, v), dout)
    eager_grads = torch.autograd.grad(eager, (q, k, v), dout)
    grads64 = torch.autograd.grad(ref64, leaves64, dout.double())
    for name, g, e, r in zip("qkv", grads, eager_grads, grads64):
        assert g.dtype == e.dtype  # a leaf's own dtype: float32 for q and k
        assert_within_budget(g, r, e, f"attention d{name} under autocast")


def _float64_of(t):
    return None if t is None else t.detach().double()


@AUTOCAST_DTYPES
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "softmax"])
def test_norms_and_softmax_return_what_torchs_return_under_autocast(kb, op, autocast_dtype):
    """16-bit inputs under autocast: the output dtype of torch's counterpart (float32 on CUDA,
    the input's on the CPU), values within budget, and with a residual, s = x + residual as the
    add computes it (autocast leaves adds alone) and y = norm(s) as torch's norm would."""
    N = 67
    x = _randn(32, N, seed=1, dtype=autocast_dtype, device=kb.device) * 3 + 1
    r = _randn(32, N, seed=2, dtype=autocast_dtype, device=kb.device)
    w = _randn(N, seed=3, dtype=autocast_dtype, device=kb.device)
    b = _randn(N, seed=4, dtype=autocast_dtype, device=kb.device)
    torch_op = {"layer_norm": lambda s, w, b: F.layer_norm(s, (N,), w, b, 1e-5),
                "rms_norm": lambda s, w, b: F.rms_norm(s, (N,), w, 1e-6),
                "softmax": lambda s, w, b: F.softmax(s, -1)}[op]
    with torch.autocast(kb.device, dtype=autocast_dtype):
        eager = torch_op(x, w, b)
        s_eager = x + r
        eager_r = torch_op(s_eager, w, b)
        if op == "layer_norm":
            got = lmfast.ops.layer_norm(x, w, b, 1e-5, backend=kb.name)
            got_r, s = lmfast.ops.layer_norm(x, w, b, 1e-5, residual=r, backend=kb.name)
        elif op == "rms_norm":
            got = lmfast.ops.rms_norm(x, w, 1e-6, backend=kb.name)
            got_r, s = lmfast.ops.rms_norm(x, w, 1e-6, residual=r, backend=kb.name)
        else:
            got, got_r, s = lmfast.ops.softmax(x, backend=kb.name), None, None
    ref64 = torch_op(*map(_float64_of, (x, w, b)))
    assert_within_budget(got, ref64, eager, f"{op} under autocast")
    if got_r is not None:
        assert s.dtype == s_eager.dtype and torch.equal(s, s_eager)
        assert_within_budget(got_r, torch_op(*map(_float64_of, (s_eager, w, b))), eager_r,
                             f"{op} with a residual under autocast")


@AUTOCAST_DTYPES
def test_modules_return_what_the_modules_they_replace_return_under_autocast(kb, autocast_dtype):
    """A 16-bit x with float32 parameters (a model kept in float32 under autocast): each lmfast
    module returns the dtype of the module it stands in for, values within budget; a float32
    parameter gets its gradient in float32."""
    LlamaRMSNorm = _transformers_module("llama").LlamaRMSNorm
    CohereLayerNorm = _transformers_module("cohere").CohereLayerNorm
    N = 48
    torch.manual_seed(0)
    pairs = {
        "LayerNorm": (torch.nn.LayerNorm(N), lmfast.nn.LayerNorm(N, backend=kb.name)),
        "LlamaRMSNorm": (LlamaRMSNorm(N), lmfast.nn.RMSNorm(N, backend=kb.name)),
        "CohereLayerNorm": (CohereLayerNorm(N), lmfast.nn.HFLayerNorm(N, backend=kb.name)),
        "torch RMSNorm": (torch.nn.RMSNorm(N), lmfast.nn.TorchRMSNorm(N, backend=kb.name)),
        "Softmax": (torch.nn.Softmax(-1), lmfast.nn.Softmax(-1, backend=kb.name)),
    }
    x = (_randn(16, N, seed=1) * 2 + 1).to(kb.device, autocast_dtype)
    for name, (original, replacement) in pairs.items():
        original.to(kb.device)
        with torch.no_grad():
            for p in original.parameters():
                p.uniform_(0.5, 1.5)
        replacement.load_state_dict(original.state_dict())
        replacement.to(kb.device)
        ref64 = torch.func.functional_call(
            original, {n: p.double() for n, p in original.named_parameters()}, (x.double(),))
        with torch.autocast(kb.device, dtype=autocast_dtype):
            eager, got = original(x), replacement(x)
        assert_within_budget(got, ref64, eager, f"{name} under autocast")
        params = list(replacement.parameters())
        if params:
            got.float().sum().backward()
            assert params[0].grad.dtype == torch.float32, name


# ---- CUDA's autocast rules, without a GPU ------------------------------------------------------

@contextlib.contextmanager
def fake_cuda_autocast(dtype: torch.dtype):
    """CUDA autocast on fake CUDA tensors: tensors made inside are on "cuda" but hold no data, and
    every op computes only dtypes and shapes, so CUDA's autocast rules run on a CPU-only torch
    (no_grad: autograd would ask for a CUDA device)."""
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
            yield
    finally:
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])


def _with_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """module with its weight replaced by an empty one of `dtype` (Module.to cannot convert fake
    parameters)."""
    module.weight = torch.nn.Parameter(torch.empty(module.weight.shape, dtype=dtype))
    return module


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["x-bf16", "x-fp32"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["params-fp32", "params-bf16"])
def test_cuda_autocast_dtypes_without_a_gpu(x_dtype, param_dtype):
    """Under CUDA autocast torch.nn.LayerNorm, torch.nn.RMSNorm and torch.nn.Softmax return
    float32 (their ops are on CUDA's float32 list; rms_norm not before torch 2.13: 2.11 leaves it
    alone), while Hugging Face RMSNorms and LayerNorms, Python code,
    return what they return without autocast; SDPA returns the autocast dtype. lmfast's modules
    and ops (reference backend: the rule is applied before any backend is chosen) return the same."""
    from lmfast.ops import _autocast

    rms_norm_autocast = "cuda" in _autocast.FLOAT32["rms_norm"]  # (read from torch's dispatcher)
    GemmaRMSNorm = _transformers_module("gemma").GemmaRMSNorm
    LlamaRMSNorm = _transformers_module("llama").LlamaRMSNorm
    Olmo2RMSNorm = _transformers_module("olmo2").Olmo2RMSNorm
    CohereLayerNorm = _transformers_module("cohere").CohereLayerNorm
    N = 32
    with fake_cuda_autocast(torch.bfloat16):
        x = torch.empty(3, N, dtype=x_dtype)
        assert x.is_cuda
        pairs = {
            "LayerNorm": (torch.nn.LayerNorm(N, dtype=param_dtype),
                          lmfast.nn.LayerNorm(N, dtype=param_dtype, backend="torch")),
            "torch RMSNorm": (_with_weight(torch.nn.RMSNorm(N), param_dtype),
                              lmfast.nn.TorchRMSNorm(N, dtype=param_dtype, backend="torch")),
            "LlamaRMSNorm": (_with_weight(LlamaRMSNorm(N), param_dtype),
                             lmfast.nn.RMSNorm(N, dtype=param_dtype, backend="torch")),
            "Olmo2RMSNorm": (_with_weight(Olmo2RMSNorm(N), param_dtype),
                             lmfast.nn.RMSNorm(N, casting="float32", dtype=param_dtype, backend="torch")),
            "GemmaRMSNorm": (_with_weight(GemmaRMSNorm(N), param_dtype),
                             lmfast.nn.RMSNorm(N, weight_offset=1.0, dtype=param_dtype, backend="torch")),
            "CohereLayerNorm": (_with_weight(CohereLayerNorm(N), param_dtype),
                                lmfast.nn.HFLayerNorm(N, dtype=param_dtype, backend="torch")),
            "Softmax": (torch.nn.Softmax(-1), lmfast.nn.Softmax(-1, backend="torch")),
        }
        dtypes = {name: (original(x).dtype, replacement(x).dtype) for name, (original, replacement) in pairs.items()}
        # the ops as their torch counterparts, and with a residual: s keeps x's dtype
        w = torch.empty(N, dtype=param_dtype)
        y, s = lmfast.ops.layer_norm(x, w, residual=x, backend="torch")
        dtypes["ops.layer_norm with a residual"] = (F.layer_norm(x + x, (N,), w).dtype, y.dtype)
        dtypes["ops.layer_norm's s"] = (x.dtype, s.dtype)
        if rms_norm_autocast or x_dtype == param_dtype:
            y, s = lmfast.ops.rms_norm(x, w, residual=x, backend="torch")
            dtypes["ops.rms_norm with a residual"] = (F.rms_norm(x + x, (N,), w).dtype, y.dtype)
            dtypes["ops.rms_norm's s"] = (x.dtype, s.dtype)
        else:  # not cast: the op takes one dtype, as it does without autocast (the modules take two)
            with pytest.raises(TypeError, match="weight has dtype"):
                lmfast.ops.rms_norm(x, w, residual=x, backend="torch")
        q = torch.empty(1, 4, 5, 8, dtype=x_dtype)
        kv = torch.empty(1, 2, 6, 8, dtype=param_dtype)
        dtypes["ops.attention"] = (torch.bfloat16, lmfast.ops.attention(q, kv, kv, backend="torch").dtype)
    assert all(want == got for want, got in dtypes.values()), dtypes
    assert dtypes["LayerNorm"][0] == dtypes["Softmax"][0] == torch.float32
    assert dtypes["torch RMSNorm"][0] == torch.float32 or not rms_norm_autocast


def test_reference_backend_is_not_autocast_inside():
    """backend="torch" computes with torch ops in the dtypes it chooses (float32 for 16-bit
    inputs): CPU autocast must not turn its matmuls into bfloat16 ones."""
    q = _randn(1, 2, 7, 16, seed=1)
    k, v = _randn(1, 2, 9, 16, seed=2), _randn(1, 2, 9, 16, seed=3)
    want = lmfast.ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lmfast.ops.attention(q, k, v, backend="torch")
    assert torch.equal(got, want)
