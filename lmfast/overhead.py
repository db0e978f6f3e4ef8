"""Per-call cost at decode sizes: each lmfast replacement against the module it replaces.

Decoding one token at a time runs every norm and attention layer on a (1, 1, hidden) input,
where the work is tiny and the host time of a call (Python, dispatch, allocation) is most of
its time: a patched model that pays more per call is slower, whatever its kernels do at large
sizes. So `lmfast bench` (its `overhead` row) times, per call, with no grad and with a
backward:

  LayerNorm  (1, 1, 768)   torch.nn.LayerNorm                 vs what lmfast.patch puts there
  RMSNorm    (1, 1, 576)   transformers' LlamaRMSNorm (with transformers only)
  RMSNorm    (1, 1, 576)   torch.nn.RMSNorm
  RMSNorm    (1, 1, 640)   transformers' Gemma3RMSNorm (1 + weight; with transformers only)
  LayerNorm  (1, 1, 768)   transformers' NemotronLayerNorm1P (1 + weight; with transformers only)
  attention  q (1, 9, 1, 64) over k, v (1, 3, 300, 64): transformers' SDPA attention function
                           vs lmfast's ("lmfast" attn_implementation), as SmolLM2 decodes
                           (lmfast.nn.Attention vs F.scaled_dot_product_attention without
                           transformers)
  attention with sinks, the same shapes: gpt-oss's eager attention function (it has no SDPA
                           path) vs lmfast's (with transformers only)
  attention with a logit softcap (50), the same shapes: Gemma 2's eager attention function (it
                           has no SDPA path either) vs lmfast's (with transformers only)
  attention varlen: 32 sequences decoding a token each over 8 cached keys (9 query heads, 3
                           kv heads), packed with cu_seqlens through lmfast's
                           flash_attn_varlen_func vs the same batch through
                           F.scaled_dot_product_attention (the documents' per-call cost);
                           in float32, and again in bfloat16

Each pair is timed in interleaved rounds (torch.utils.benchmark medians, the best of the
rounds kept), so a slow spell of a shared machine does not land on one side only. The issue's
targets: within 1.3x of the replaced module without grad, 1.5x with.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

import lmfast

TARGETS = {"fwd": 1.3, "fwd+bwd": 1.5}  # lmfast's time / the replaced module's, at most


@dataclass
class OverheadResult:
    case: str           # e.g. "LayerNorm (1, 1, 768)"
    theirs: str         # the module or function lmfast replaces
    ours: str
    direction: str      # "fwd" (under no_grad) or "fwd+bwd" (gradients of the input and parameters)
    theirs_us: float    # microseconds a call
    ours_us: float
    ratio: float        # ours_us / theirs_us (< 1: lmfast's call costs less)
    target: float       # the ratio lmfast must stay within


@dataclass
class _Pair:
    case: str
    theirs: str
    ours: str
    build: Callable[[str, bool], tuple[Callable[[], object], Callable[[], object]]]
    # build(device, grad) -> (their call, our call); with grad, each call runs forward + backward


def _module_pair(original: torch.nn.Module, shape: tuple[int, ...], backend: str = "auto"):
    """(original, the module lmfast.patch(backend=backend) swaps in for it) as a build function."""
    def build(device: str, grad: bool):
        theirs = copy.deepcopy(original).to(device)
        holder = torch.nn.ModuleDict({"m": copy.deepcopy(theirs)})
        lmfast.patch(holder, backend=backend)
        ours = holder["m"]
        assert type(ours).__module__.startswith("lmfast"), f"lmfast.patch did not swap {type(original).__name__}"
        x = torch.randn(shape, device=device, requires_grad=grad)
        return _calls(theirs, x, grad), _calls(ours, x, grad)
    return build


def _calls(module: torch.nn.Module, x: torch.Tensor, grad: bool) -> Callable[[], object]:
    if not grad:
        return torch.no_grad()(lambda: module(x))
    leaves = [x, *module.parameters()]
    dy = torch.ones_like(module(x))
    return lambda: torch.autograd.grad(module(x), leaves, dy)


def _decode_qkv(device: str, grad: bool):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=g).to(device).requires_grad_(grad)   # (B, Hq, Sq, D)
    k = torch.randn(1, 3, 300, 64, generator=g).to(device).requires_grad_(grad)  # (B, Hkv, Sk, D)
    v = torch.randn(1, 3, 300, 64, generator=g).to(device).requires_grad_(grad)
    return q, k, v


def _decode_layer() -> torch.nn.Module:
    """What transformers' attention functions read off a layer (3 query heads per kv head)."""
    layer = torch.nn.Module()
    layer.is_causal, layer.num_key_value_groups, layer.training = True, 3, False
    return layer


def _timed_calls(theirs: Callable[[], torch.Tensor], ours: Callable[[], torch.Tensor], leaves, grad: bool):
    """(their call, our call) as timed: under no_grad, or forward + the gradients of `leaves`."""
    if not grad:
        return torch.no_grad()(theirs), torch.no_grad()(ours)
    dy = torch.ones_like(theirs())
    return (lambda: torch.autograd.grad(theirs(), leaves, dy)), (lambda: torch.autograd.grad(ours(), leaves, dy))


def _sinks_attention_pair(device: str, grad: bool):
    """gpt-oss's eager attention function (attention sinks) against lmfast's."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from .integrations import hf

    q, k, v = _decode_qkv(device, grad)
    layer = _decode_layer()
    layer.sinks = torch.nn.Parameter(torch.randn(9, generator=torch.Generator().manual_seed(1)).to(device),
                                     requires_grad=grad)
    theirs = lambda: eager_attention_forward(layer, q, k, v, None, scaling=0.125)[0]  # noqa: E731
    ours = lambda: hf.attention_forward(layer, q, k, v, None, scaling=0.125, s_aux=layer.sinks)[0]  # noqa: E731
    return _timed_calls(theirs, ours, (q, k, v, layer.sinks), grad)


def _softcap_attention_pair(device: str, grad: bool):
    """Gemma 2's eager attention function (logit softcapping) against lmfast's."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from .integrations import hf

    q, k, v = _decode_qkv(device, grad)
    layer = _decode_layer()
    theirs = lambda: eager_attention_forward(layer, q, k, v, None, scaling=0.125, softcap=50.0)[0]  # noqa: E731
    ours = lambda: hf.attention_forward(layer, q, k, v, None, scaling=0.125, softcap=50.0)[0]  # noqa: E731
    return _timed_calls(theirs, ours, (q, k, v), grad)


def _varlen_attention_pair(device: str, grad: bool, dtype: torch.dtype = torch.float32):
    """Continuous batching: 32 sequences decoding a token each over their own 8 cached keys,
    packed (flash-attn's varlen layout and cu_seqlens) through lmfast's flash_attn_varlen_func,
    against the same work as one padding-free batch through F.scaled_dot_product_attention (what
    runs without varlen; its output squeezed to the packed layout, one view). The per-call cost
    of the documents: their checks and the kernels' table of them, and each document's short
    key tile (in bfloat16 on the CPU, 6-7x SDPA's time with grad until each packed tile took
    its own keys' room, not a full tile's)."""
    from .integrations.flash_attn import flash_attn_varlen_func

    n, ctx, Hq, Hkv, D = 32, 8, 9, 3, 64
    g = torch.Generator().manual_seed(2)
    q = torch.randn(n, Hq, D, generator=g).to(device, dtype).requires_grad_(grad)          # (total_q, Hq, D)
    k = torch.randn(n * ctx, Hkv, D, generator=g).to(device, dtype).requires_grad_(grad)   # (total_k, Hkv, D)
    v = torch.randn(n * ctx, Hkv, D, generator=g).to(device, dtype).requires_grad_(grad)
    cu_q = torch.arange(n + 1, dtype=torch.int32, device=device)
    cu_k = cu_q * ctx
    qb = q.view(n, 1, Hq, D).transpose(1, 2)  # (n, Hq, 1, D)
    kb, vb = (t.view(n, ctx, Hkv, D).transpose(1, 2) for t in (k, v))  # (n, Hkv, ctx, D)
    theirs = lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True).squeeze(2)  # noqa: E731
    ours = lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, ctx, causal=True)  # noqa: E731
    return _timed_calls(theirs, ours, (q, k, v), grad)


def _attention_pair(device: str, grad: bool, backend: str = "auto"):
    """transformers' SDPA attention function against lmfast's (without transformers, or for a
    named backend: F.scaled_dot_product_attention against lmfast.nn.Attention)."""
    q, k, v = _decode_qkv(device, grad)
    try:
        if backend != "auto":
            raise ImportError  # (the plain pair below)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from .integrations import hf
    except ImportError:
        attention = lmfast.nn.Attention(backend=backend)
        theirs = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        ours = lambda: attention(q, k, v)  # noqa: E731
    else:
        layer = _decode_layer()
        theirs = lambda: sdpa_attention_forward(layer, q, k, v, None, scaling=0.125)[0]  # noqa: E731
        ours = lambda: hf.attention_forward(layer, q, k, v, None, scaling=0.125)[0]  # noqa: E731
    return _timed_calls(theirs, ours, (q, k, v), grad)


def pairs(device: str = "cpu") -> list[_Pair]:
    """The pairs timed on `device`: on a GPU with the CUDA C++ kernels, also the same modules
    on backend="cuda" (what "auto" runs there is Triton's)."""
    llama_rms = gemma_rms = nemotron_ln = None
    try:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P

        llama_rms = LlamaRMSNorm(576, eps=1e-6)
        gemma_rms = Gemma3RMSNorm(640, eps=1e-6)
        nemotron_ln = NemotronLayerNorm1P(768, eps=1e-5)
        attention_names = ("transformers sdpa_attention_forward", "lmfast attn_implementation")
    except ImportError:
        attention_names = ("F.scaled_dot_product_attention", "lmfast.nn.Attention")
    torch_rms = torch.nn.RMSNorm(576, eps=1e-6)
    with torch.no_grad():  # not the identity: a probe or a kernel must not get it easy
        torch_rms.weight.uniform_(0.5, 1.5)
        if llama_rms is not None:
            llama_rms.weight.uniform_(0.5, 1.5)
            gemma_rms.weight.uniform_(-0.5, 0.5)  # (its scale is 1 + weight)
            nemotron_ln.weight.uniform_(-0.5, 0.5)  # (so is its)
    found = [_Pair("LayerNorm (1, 1, 768)", "torch.nn.LayerNorm", "lmfast.nn.LayerNorm",
                   _module_pair(torch.nn.LayerNorm(768), (1, 1, 768)))]
    if llama_rms is not None:
        found.append(_Pair("RMSNorm (1, 1, 576)", "LlamaRMSNorm", "lmfast.nn.RMSNorm",
                           _module_pair(llama_rms, (1, 1, 576))))
    found.append(_Pair("RMSNorm torch (1, 1, 576)", "torch.nn.RMSNorm", "lmfast.nn.TorchRMSNorm",
                       _module_pair(torch_rms, (1, 1, 576))))
    if gemma_rms is not None:
        found.append(_Pair("RMSNorm 1 + weight (1, 1, 640)", "Gemma3RMSNorm", "lmfast.nn.RMSNorm",
                           _module_pair(gemma_rms, (1, 1, 640))))
        found.append(_Pair("LayerNorm 1 + weight (1, 1, 768)", "NemotronLayerNorm1P", "lmfast.nn.LayerNorm1P",
                           _module_pair(nemotron_ln, (1, 1, 768))))
    found.append(_Pair("attention 9x1 over 3x300, D=64", *attention_names, _attention_pair))
    found.append(_Pair("attention varlen 32x(9x1 over 3x8)", "F.sdpa on the same batch",
                       "lmfast flash_attn_varlen_func", _varlen_attention_pair))
    found.append(_Pair("attention varlen 32x(9x1 over 3x8) bf16", "F.sdpa on the same batch",
                       "lmfast flash_attn_varlen_func",
                       lambda device, grad: _varlen_attention_pair(device, grad, torch.bfloat16)))
    if llama_rms is not None:
        found.append(_Pair("attention + sinks 9x1 over 3x300", "gpt-oss eager_attention_forward",
                           "lmfast attn_implementation", _sinks_attention_pair))
        found.append(_Pair("attention + softcap 9x1 over 3x300", "Gemma 2 eager_attention_forward",
                           "lmfast attn_implementation", _softcap_attention_pair))
    if device == "cuda" and lmfast.backends()["cuda"].available:
        found += [
            _Pair("LayerNorm (1, 1, 768) [cuda]", "torch.nn.LayerNorm", "lmfast.nn.LayerNorm cuda",
                  _module_pair(torch.nn.LayerNorm(768), (1, 1, 768), backend="cuda")),
            _Pair("RMSNorm torch (1, 1, 576) [cuda]", "torch.nn.RMSNorm", "lmfast.nn.TorchRMSNorm cuda",
                  _module_pair(torch_rms, (1, 1, 576), backend="cuda")),
            _Pair("attention 9x1/3x300 [cuda]", "F.scaled_dot_product_attention", "lmfast.nn.Attention cuda",
                  lambda device, grad: _attention_pair(device, grad, backend="cuda")),
        ]
    return found


def steps(rounds: int, device: str = "cpu") -> int:
    """Progress steps of run(): one per (pair, direction, round)."""
    return len(pairs(device)) * len(TARGETS) * rounds


def run(device: str, *, rounds: int = 3, min_run_time: float = 0.2,
        progress: Callable[[str], None] | None = None) -> list[OverheadResult]:
    from .benchmarking import seconds

    results = []
    for pair in pairs(device):
        for direction, target in TARGETS.items():
            theirs, ours = pair.build(device, direction == "fwd+bwd")
            best = {"theirs": float("inf"), "ours": float("inf")}
            for r in range(rounds):
                if progress:
                    progress(f"overhead: {pair.case} {direction}, round {r + 1}/{rounds}")
                order = (("theirs", theirs), ("ours", ours)) if r % 2 == 0 else (("ours", ours), ("theirs", theirs))
                for side, fn in order:
                    best[side] = min(best[side], seconds(fn, device, min_run_time))
            t, o = best["theirs"] * 1e6, best["ours"] * 1e6
            results.append(OverheadResult(pair.case, pair.theirs, pair.ours, direction, t, o, o / t, target))
    return results


def as_dicts(results: list[OverheadResult]) -> list[dict]:
    return [dataclasses.asdict(r) for r in results]


def format_table(results: list[dict]) -> str:
    width = max([len("per-call cost (decode sizes)")] + [len(r["case"]) for r in results])
    lines = [f"{'per-call cost (decode sizes)':{width}s} {'dir':7s} {'replaced module':36s} {'us':>8s} {'lmfast us':>9s} "
             f"{'ratio':>6s} {'target':>7s}"]
    for r in results:
        lines.append(f"{r['case']:{width}s} {r['direction']:7s} {r['theirs']:36s} {r['theirs_us']:8.1f} "
                     f"{r['ours_us']:9.1f} {r['ratio']:5.2f}x {'<= ' + format(r['target'], '.1f') + 'x':>7s}")
    lines.append("ratio = lmfast's time a call / the replaced module's (< 1: lmfast costs less); fwd: no grad, "
                 "fwd+bwd: forward and the gradients of input and parameters")
    return "\n".join(lines)
