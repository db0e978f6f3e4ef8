"""The lean call path (issue 11): on CPU tensors an op or module forward is one C++ op call
(torch.ops.lmfast_C.<op>) that checks its own arguments and has its autograd in C++; it still
honors LMFAST_BACKEND, traces under torch.compile (dynamic shapes included) and passes
torch.library.opcheck. Modules keep every attribute of the modules they replace readable and
writable. (Its speed is measured by `lmfast bench --ops overhead`, not here.)"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import lmfast
from lmfast import reference
from lmfast.testing import dispatched_ops

transformers = pytest.importorskip("transformers", reason="transformers is part of the test extras")


class _TorchCalls(TorchFunctionMode):
    """Records the torch-level calls (torch functions, tensor methods, torch.ops) made under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not str(func).startswith("<method-wrapper '__get__'"):  # attribute reads (x.is_cpu)
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def _decode_calls():
    """(name, call, C++ public op, kernel op) at decode sizes, as a patched model makes them."""
    ln, rms = lmfast.nn.LayerNorm(768), lmfast.nn.RMSNorm(576)
    x, xr = torch.randn(1, 1, 768), torch.randn(1, 1, 576)
    q, k, v = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 300, 64), torch.randn(1, 3, 300, 64)
    s = torch.randn(1, 12, 1, 48)
    return [
        ("nn.LayerNorm", lambda: ln(x), "layer_norm", "layer_norm_fwd"),
        ("nn.RMSNorm", lambda: rms(xr), "rms_norm", "rms_norm_fwd"),
        ("ops.layer_norm", lambda: lmfast.ops.layer_norm(x, ln.weight, ln.bias), "layer_norm", "layer_norm_fwd"),
        ("ops.rms_norm", lambda: lmfast.ops.rms_norm(xr, rms.weight), "rms_norm", "rms_norm_fwd"),
        ("ops.attention", lambda: lmfast.ops.attention(q, k, v), "attention", "attention_fwd"),
        ("nn.Attention", lambda: lmfast.nn.Attention()(q, k, v), "attention", "attention_fwd"),
        ("ops.softmax", lambda: lmfast.ops.softmax(s, -1, 0.125), "softmax", "softmax_fwd"),
    ]


@pytest.mark.parametrize("case", range(len(_decode_calls())), ids=[c[0] for c in _decode_calls()])
def test_a_cpu_call_is_one_cpp_op(case):
    name, call, public, kernel = _decode_calls()[case]
    call()  # (loads the extension)
    with torch.no_grad():
        with _TorchCalls() as torch_calls:
            call()
        with dispatched_ops() as dispatched:
            call()
    assert torch_calls.calls == [f"lmfast_C.{public}.default"], torch_calls.calls
    assert dispatched.ops == [f"lmfast_C.{kernel}.default"], dispatched.ops


def test_with_grad_the_backward_is_the_kernel_op_too():
    ln = lmfast.nn.LayerNorm(768)
    x = torch.randn(1, 1, 768, requires_grad=True)
    y = ln(x)
    assert "LayerNormFwd" in y.grad_fn.name()  # the C++ autograd node (csrc/api.cpp)
    with dispatched_ops() as dispatched:
        y.backward(torch.ones_like(y))
    assert [op for op in dispatched.ops if op.startswith("lmfast")] == ["lmfast_C.layer_norm_bwd.default"]
    torch.testing.assert_close(x.grad, torch.func.grad(
        lambda t: torch.nn.functional.layer_norm(t, (768,), ln.weight, ln.bias).sum())(x.detach()))


def test_lmfast_backend_torch_is_honored_by_the_cpp_call_path(set_backend_env, monkeypatch):
    ran = []
    for name in ("layer_norm", "rms_norm", "attention", "softmax"):
        def spy(*args, _fn=getattr(reference, name), **kwargs):
            ran.append(_fn.__name__)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(reference, name, spy)
    set_backend_env("torch")
    for _, call, _, _ in _decode_calls():
        call()
    assert ran == ["layer_norm", "rms_norm", "layer_norm", "rms_norm", "attention", "attention", "softmax"]
    set_backend_env(None)
    ran.clear()
    for _, call, _, _ in _decode_calls():
        call()
    assert ran == []


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "softmax", "attention"])
def test_public_cpp_ops_pass_opcheck(op):
    lmfast.backends()
    x = torch.randn(3, 5, 8)
    args = {
        "layer_norm": (x, torch.randn(8), torch.randn(8), torch.randn(3, 5, 8), 1e-5),
        "rms_norm": (x, torch.randn(8), None, 1e-6),
        "softmax": (torch.randn(2, 3, 5, 7), -1, 0.5, torch.randn(5, 7), True),
        "attention": (torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8),
                      torch.rand(2, 1, 1, 7) > 0.2, True, None, 3),
    }[op]
    torch.library.opcheck(getattr(torch.ops.lmfast_C, op), args)


def test_compiled_with_dynamic_shapes_the_cpp_checks_see_symbolic_sizes():
    """The public C++ ops read shapes as SymInts: a dynamic-shape graph traces through them."""
    torch._dynamo.reset()

    def block(x, w, q, k, v, pad):
        h = lmfast.ops.rms_norm(lmfast.ops.layer_norm(x, w, w), w)
        p = lmfast.ops.softmax(h @ h.transpose(-1, -2), -1, 0.5, pad[:, 0])
        return p @ h, lmfast.ops.attention(q, k, v, pad, causal=True)

    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="aot_eager")
    w = torch.randn(16)
    for S in (5, 9, 13):
        x = torch.randn(2, S, 16, requires_grad=True)
        q, k, v = (torch.randn(2, 4, S, 16, requires_grad=True) for _ in range(3))
        pad = torch.rand(2, 1, 1, S) > 0.2
        want, got = block(x, w, q, k, v, pad), compiled(x, w, q, k, v, pad)
        torch.testing.assert_close(got, want)
        g_want = torch.autograd.grad(sum(t.sum() for t in want), (x, q, k, v))
        g_got = torch.autograd.grad(sum(t.sum() for t in got), (x, q, k, v))
        torch.testing.assert_close(g_got, g_want)


# ---- drop-in attributes -------------------------------------------------------------------------

def test_rms_norm_eps_is_readable_and_writable_under_both_names():
    """Regression: lmfast.nn.RMSNorm.eps was a read-only property; transformers' test helpers
    (and user code) set it, as torch.nn.RMSNorm and LlamaRMSNorm accept."""
    norm = lmfast.nn.RMSNorm(32, eps=1e-6)
    x = torch.randn(4, 32) * 1e-2
    setattr(norm, "eps", 1.0)
    assert norm.eps == norm.variance_epsilon == 1.0
    torch.testing.assert_close(norm(x), reference.rms_norm(x, norm.weight, 1.0))
    norm.variance_epsilon = 0.5
    assert norm.eps == 0.5
    torch.testing.assert_close(norm(x), reference.rms_norm(x, norm.weight, 0.5))


def test_layer_norm_attributes_are_read_on_every_call():
    ln = lmfast.nn.LayerNorm(16)
    x = torch.randn(3, 16) * 1e-2
    ln.eps = 1.0
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (16,), ln.weight, ln.bias, 1.0))
    ln.backend = "torch"
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (16,), ln.weight, ln.bias, 1.0))


def test_patched_norms_keep_the_originals_attributes_both_ways():
    """Every plain attribute of a swapped module stays readable and writable on its replacement,
    and what was written there is what unpatch() gives back to the original."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class MyLayerNorm(torch.nn.LayerNorm):  # a subclass with an attribute of its own
        def __init__(self, n):
            super().__init__(n)
            self.tag = "pre-norm"

    model = torch.nn.ModuleDict({"llama": LlamaRMSNorm(16, eps=1e-6), "torch_rms": torch.nn.RMSNorm(16, eps=1e-5),
                                 "ln": MyLayerNorm(16)})
    report = lmfast.patch(model)
    assert sum(report.swapped.values()) == 3, report
    llama, torch_rms, ln = model["llama"], model["torch_rms"], model["ln"]
    assert llama.variance_epsilon == llama.eps == 1e-6
    assert torch_rms.eps == 1e-5 and torch_rms.normalized_shape == (16,) and torch_rms.elementwise_affine
    assert ln.tag == "pre-norm" and ln.eps == 1e-5 and ln.normalized_shape == (16,)
    x = torch.randn(3, 16) * 1e-2
    llama.eps, torch_rms.eps, ln.eps = 1.0, 0.5, 0.25
    torch.testing.assert_close(llama(x), reference.rms_norm(x, llama.weight, 1.0))
    torch.testing.assert_close(torch_rms(x), reference.rms_norm(x, torch_rms.weight, 0.5))
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (16,), ln.weight, ln.bias, 0.25))
    lmfast.unpatch(model)
    assert type(model["llama"]) is LlamaRMSNorm and model["llama"].variance_epsilon == 1.0
    assert type(model["torch_rms"]) is torch.nn.RMSNorm and model["torch_rms"].eps == 0.5
    assert type(model["ln"]) is MyLayerNorm and model["ln"].eps == 0.25
