"""torch.compile traces the ops without graph breaks (fake impls and autograd registered on
the custom ops), forward and backward, and gives the eager results."""

import shutil
from pathlib import Path

import pytest
import torch

import lmfast


class Block(torch.nn.Module):
    """A pre-norm attention-like block using every lmfast op."""

    def __init__(self, dim=32, backend="auto"):
        super().__init__()
        self.ln = lmfast.nn.LayerNorm(dim, backend=backend)
        self.rms = lmfast.nn.RMSNorm(dim, backend=backend)
        self.gemma_rms = lmfast.nn.RMSNorm(dim, weight_offset=1.0, backend=backend)  # scale 1 + weight
        self.cohere_ln = lmfast.nn.HFLayerNorm(dim, backend=backend)  # no bias, in float32
        self.sm = lmfast.nn.Softmax(dim=-1, scale=dim ** -0.5, causal=True, backend=backend)
        self.attn = lmfast.nn.Attention(causal=True, backend=backend)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, residual, pad_mask):
        y, s = self.ln(x, residual)                 # (B, S, D)
        h = self.gemma_rms(self.rms(self.cohere_ln(self.proj(y))))
        p = self.sm(h @ h.transpose(-1, -2), pad_mask)  # (B, S, S)
        heads = h.view(h.shape[0], h.shape[1], 2, -1).transpose(1, 2)  # (B, 2, S, D/2)
        a = self.attn(heads, heads[:, :1], heads[:, 1:], pad_mask[:, None])  # 2 query heads, 1 kv head
        return p @ h + s + a.transpose(1, 2).reshape(h.shape)


def _inputs(device, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 32, generator=g).to(device).requires_grad_(requires_grad)
    r = torch.randn(2, 16, 32, generator=g).to(device).requires_grad_(requires_grad)
    pad = torch.ones(2, 1, 16, dtype=torch.bool, device=device)
    pad[1, :, 12:] = False
    return x, r, pad


def _fwd_bwd(model, x, r, pad):
    out = model(x, r, pad)
    grads = torch.autograd.grad(out.square().sum(), [x, r, *model.parameters()])
    return out, grads


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(kb, compiler):
    torch._dynamo.reset()
    model = Block(backend=kb.name).to(kb.device)
    x, r, pad = _inputs(kb.device)
    want = _fwd_bwd(model, x, r, pad)
    compiled = torch.compile(model, backend=compiler, fullgraph=True)  # a graph break raises
    got = _fwd_bwd(compiled, x, r, pad)
    torch.testing.assert_close(got, want)


def test_fullgraph_compile_under_autocast_matches_eager(kb):
    """Under torch.autocast the ops apply torch's autocast rules in Python (lmfast/ops/_autocast.py):
    traced without graph breaks, forward and backward, with the eager results."""
    torch._dynamo.reset()
    model = Block(backend=kb.name).to(kb.device)
    x, r, pad = _inputs(kb.device)
    with torch.autocast(kb.device, dtype=torch.bfloat16):
        want = _fwd_bwd(model, x, r, pad)
        got = _fwd_bwd(torch.compile(model, backend="aot_eager", fullgraph=True), x, r, pad)
    assert want[0].dtype == got[0].dtype
    torch.testing.assert_close(got, want)


def test_attention_sinks_compile_fullgraph(kb):
    """Attention sinks are composed from the kernel's (o, lse) with torch ops: traced with them,
    forward and the sinks' gradient as eager."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 16, generator=g).to(kb.device).requires_grad_()
    k, v = torch.randn(2, 1, 2, 7, 16, generator=g).to(kb.device).unbind(0)
    sinks = torch.randn(4, generator=g).to(kb.device).requires_grad_()

    def f(q, k, v, sinks):
        return lmfast.ops.attention(q, k, v, causal=True, sinks=sinks, backend=kb.name)
    want, got = f(q, k, v, sinks), torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, sinks)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), (q, sinks)), torch.autograd.grad(want.sum(), (q, sinks)))


def test_attention_softcap_compile_fullgraph(kb):
    """A softcap (Gemma 2) is a float argument of the kernel ops: traced without a graph break,
    forward and gradients as eager."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 4, 5, 16, generator=g) * 3).to(kb.device).requires_grad_()
    k, v = torch.randn(2, 1, 2, 7, 16, generator=g).to(kb.device).unbind(0)

    def f(q, k, v):
        return lmfast.ops.attention(q, k, v, causal=True, softcap=2.0, backend=kb.name)
    want, got = f(q, k, v), torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), q), torch.autograd.grad(want.sum(), q))


def test_custom_ops_appear_in_the_graph(kb):
    """Dynamo records one node per lmfast call (for the C++ backend, its public op); the graph
    that AOTAutograd hands the compiler holds the kernel ops, whose fake impls traced it."""
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    dynamo_nodes, aot_nodes = [], []

    def targets(gm, into):
        into.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")

    def capture(gm, example_inputs):
        targets(gm, dynamo_nodes)
        return aot_autograd(fw_compiler=lambda g, _: targets(g, aot_nodes) or g)(gm, example_inputs)

    model = Block(backend=kb.name).to(kb.device)
    x, r, pad = _inputs(kb.device, requires_grad=False)
    torch.compile(model, backend=capture, fullgraph=True)(x, r, pad)
    ns = {"cpu": "lmfast_C", "cuda": "lmfast_C", "triton": "lmfast_triton"}[kb.name]
    kernel_ops = {f"{ns}.{op}_fwd.default" for op in ("layer_norm", "rms_norm", "softmax", "attention")}
    assert kernel_ops <= set(aot_nodes), aot_nodes
    if kb.name in ("cpu", "cuda"):  # the C++ public ops, traced into their kernel ops
        assert {f"lmfast_C.{op}.default" for op in ("layer_norm", "rms_norm", "softmax", "attention")} <= set(dynamo_nodes)


def test_dynamic_shapes(kb):
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: lmfast.ops.rms_norm(x, w, backend=kb.name), fullgraph=True,
                      dynamic=True, backend="aot_eager")
    w = torch.randn(24, device=kb.device)
    for rows in (3, 17, 40):
        x = torch.randn(rows, 24, device=kb.device)
        torch.testing.assert_close(f(x, w), lmfast.ops.rms_norm(x, w, backend="torch"))


OP_NAMES = ["layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd", "softmax_fwd", "softmax_bwd",
            "attention_fwd", "attention_bwd"]


@pytest.mark.parametrize("name", OP_NAMES)
def test_cpp_and_triton_ops_share_one_schema(name):
    lmfast.backends()  # loads the C++ library
    cpp = getattr(torch.ops.lmfast_C, name).default._schema
    tri = getattr(torch.ops.lmfast_triton, name).default._schema
    assert [(a.name, str(a.type)) for a in cpp.arguments] == [(a.name, str(a.type)) for a in tri.arguments]
    assert [str(r.type) for r in cpp.returns] == [str(r.type) for r in tri.returns]


def test_opcheck_custom_ops(kb):
    """torch.library.opcheck: schema, fake impl and autograd registration are consistent."""
    lmfast.backends()
    ns = getattr(torch.ops, {"cpu": "lmfast_C", "cuda": "lmfast_C", "triton": "lmfast_triton"}[kb.name])
    dev = kb.device
    x, r = torch.randn(16, 33, device=dev), torch.randn(16, 33, device=dev)
    w, b = torch.randn(33, device=dev), torch.randn(33, device=dev)
    torch.library.opcheck(ns.layer_norm_fwd, (x, w, b, r, 1e-5))
    torch.library.opcheck(ns.rms_norm_fwd, (x, w, None, 1e-6))
    torch.library.opcheck(ns.rms_norm_fwd, (x, w, r, 1e-6, 1.0))  # Gemma's scale, 1 + weight
    x4 = torch.randn(2, 3, 5, 7, device=dev)
    mask = torch.randn(1, 3, 1, 7, device=dev).expand(2, 3, 5, 7)
    torch.library.opcheck(ns.softmax_fwd, (x4, mask, 0.5, True))


def test_import_lmfast_leaves_dynamo_unloaded_and_marks_backend_choice_when_it_loads():
    """`import lmfast` must not pay for importing torch._dynamo (~2 s); the backend choice is
    still a trace-time constant once dynamo loads."""
    import subprocess
    import sys
    import tempfile

    code = ("import sys, lmfast\n"
            "from lmfast.ops import _common\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            "import torch._dynamo\n"
            "assert _common._resolve._dynamo_marked_constant\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tempfile.gettempdir())  # (not the checkout's lmfast, which `python -c` would import)
    assert p.returncode == 0, p.stderr


def test_compile_caches_are_keyed_by_the_ops_definitions(tmp_path):
    """A graph cached on disk by torch.compile under an lmfast whose ops had other schemas or
    decompositions calls them as they were (seen when the norm backward ops gained eps, and when
    attention_bwd took row stats for lse): lmfast adds a digest of the files defining them to
    torch.compile's cache key, keeping any tag the user set; a change to any of them changes it."""
    import torch.compiler.config as compiler_config

    tag = lmfast.compile_cache_tag()
    assert tag in compiler_config.cache_key_tag.split("+")
    saved = compiler_config.cache_key_tag
    try:
        compiler_config.cache_key_tag = "mine"
        lmfast._tag_compile_caches()
        lmfast._tag_compile_caches()
        assert compiler_config.cache_key_tag == f"mine+{tag}"
    finally:
        compiler_config.cache_key_tag = saved
    # a copy of the package's defining files: each edit gives another tag
    package = Path(lmfast.__file__).parent
    csrc = package / "_csrc" if (package / "_csrc").is_dir() else package.parent / "csrc"
    copy = tmp_path / "lmfast"
    (copy / "_csrc").mkdir(parents=True)
    shutil.copytree(package / "ops", copy / "ops")
    for name in ("ops.cpp", "api.cpp"):
        shutil.copy(csrc / name, copy / "_csrc" / name)
    assert lmfast.compile_cache_tag(copy) == tag
    seen = {tag}
    for edited in (copy / "_csrc" / "ops.cpp", copy / "_csrc" / "api.cpp", copy / "ops" / "attention.py"):
        edited.write_text(edited.read_text() + "\n")
        seen.add(lmfast.compile_cache_tag(copy))
    assert len(seen) == 4
