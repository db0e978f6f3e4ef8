"""lmfast.patch / lmfast.unpatch: swap a model's modules for lmfast's, in place.

One table (SWAPS) says which modules are candidates and how to build the replacement. A
norm or softmax candidate is swapped only if a probe shows it computes what the replacement
computes: the probe runs a copy of the module, with random parameters, against the
replacement sharing those parameters. A candidate may compute one of several forms (an
RMSNorm scales by weight, as Llama's, or by 1 + weight, as Gemma's): the first form the probe
confirms is the one built. So a look-alike with another formula is left alone and reported,
never silently changed.

Replacements share the original's Parameter objects (optimizers, state_dict() and
save_pretrained() see the same tensors under the same keys) and keep the original module, so
unpatch() puts it back as it was.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import nn as lmnn
from . import hf  # (imports no transformers code until used)

_ORIGINAL = "_lmfast_original"  # attribute of a replacement: the module it replaced


@dataclass
class PatchReport:
    """What patch() did: swapped modules per kind, and the candidates it left alone, with why."""
    swapped: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)
    already_patched: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        done = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.swapped.items())) or "nothing swapped"
        lines = [f"lmfast.patch: {done}"]
        if self.already_patched:
            lines.append(f"  already patched: {self.already_patched} modules")
        for path, why in self.skipped:
            lines.append(f"  skipped {path or '(model)'}: {why}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


# ---- the swap table --------------------------------------------------------------------------

def _layer_norm(module: nn.LayerNorm, backend: str, one_plus_weight: bool = False) -> nn.Module:
    """torch's LayerNorm, or with one_plus_weight Nemotron's (scale 1 + weight: lmfast.nn.LayerNorm1P)."""
    cls = lmnn.LayerNorm1P if one_plus_weight else lmnn.LayerNorm
    new = cls(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
              bias=module.bias is not None, backend=backend, device="meta")
    new.weight, new.bias = module.weight, module.bias  # the same Parameters (or None)
    return new


def _plain_layer_norm(module: nn.Module, backend: str, eps: float = 1e-5) -> nn.Module:
    """A Hugging Face LayerNorm without parameters (OLMo's: F.layer_norm in float32, returned in
    x's dtype, eps 1e-5 in its code): eps is the module's own attribute where it has one, else the
    form's, which the probe confirms (its small input tells 1e-5 from 1e-6)."""
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", eps))
    return lmnn.LayerNorm(module.normalized_shape, eps=float(eps), elementwise_affine=False, backend=backend)


def _hf_norm(module: nn.Module, backend: str, weight_offset: float = 0.0, casting: str | None = None,
             subtract_mean: bool = False) -> nn.Module:
    """A Hugging Face-style norm with a weight: an RMSNorm, or with subtract_mean a LayerNorm in
    float32 (Cohere's)."""
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", None)))
    if subtract_mean:
        new = lmnn.HFLayerNorm(module.weight.shape[0], eps=eps, backend=backend, device="meta")
    else:
        new = lmnn.RMSNorm(module.weight.shape[0], eps=eps, weight_offset=weight_offset, casting=casting,
                           backend=backend, device="meta")
    new.weight = module.weight
    return new


def _torch_rms_norm(module: nn.RMSNorm, backend: str) -> nn.Module:
    new = lmnn.TorchRMSNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                            backend=backend, device="meta")
    new.weight = module.weight  # the same Parameter (or None)
    return new


def _softmax(module: nn.Softmax, backend: str) -> nn.Module:
    return lmnn.Softmax(module.dim, backend=backend)


def _multihead_attention(module: nn.MultiheadAttention, backend: str) -> nn.Module:
    return lmnn.MultiheadAttention.from_torch(module, backend)


def _is_layer_norm(module: nn.Module) -> str | None:
    return None if isinstance(module, nn.LayerNorm) and not isinstance(module, lmnn.LayerNorm) else NOT_A_CANDIDATE


def _is_torch_rms_norm(module: nn.Module) -> str | None:
    return None if isinstance(module, nn.RMSNorm) and not isinstance(module, lmnn.TorchRMSNorm) else NOT_A_CANDIDATE


def _is_hf_rms_norm(module: nn.Module) -> str | None:
    """Hugging Face style RMSNorm: a class named *RMSNorm, or *LayerNorm without a bias (T5's is
    an RMSNorm by that name, Cohere's a LayerNorm), with a 1-D `weight` and an epsilon
    (torch.nn.RMSNorm and torch.nn.LayerNorm, and their subclasses, have their own swaps). The
    probe decides which, if any, of the forms it computes."""
    weight = getattr(module, "weight", None)
    name = type(module).__name__
    looks_like = ((name.endswith("RMSNorm") or (name.endswith("LayerNorm") and getattr(module, "bias", None) is None))
                  and not isinstance(module, (lmnn.RMSNorm, nn.RMSNorm, nn.LayerNorm))
                  and isinstance(weight, nn.Parameter) and weight.dim() == 1
                  and isinstance(getattr(module, "variance_epsilon", getattr(module, "eps", None)), float))
    return None if looks_like else NOT_A_CANDIDATE


def _is_plain_hf_layer_norm(module: nn.Module) -> str | None:
    """A class named *LayerNorm with a `normalized_shape` and no parameters or submodules at all
    (OLMo's): torch.nn.LayerNorm and its subclasses have their own swap."""
    shape = getattr(module, "normalized_shape", None)
    looks_like = (type(module).__name__.endswith("LayerNorm") and not isinstance(module, nn.LayerNorm)
                  and isinstance(shape, (tuple, list, int)) and next(module.parameters(), None) is None
                  and next(module.children(), None) is None)
    return None if looks_like else NOT_A_CANDIDATE


def _is_softmax(module: nn.Module) -> str | None:
    if type(module) is not nn.Softmax:
        return NOT_A_CANDIDATE
    return "has dim=None (torch's legacy implicit dim)" if module.dim is None else None


def _is_multihead_attention(module: nn.Module) -> str | None:
    if not isinstance(module, nn.MultiheadAttention) or isinstance(module, lmnn.MultiheadAttention):
        return NOT_A_CANDIDATE
    if module.bias_k is not None or module.add_zero_attn:
        return "uses add_bias_kv / add_zero_attn, which lmfast attention does not serve"
    return None


NOT_A_CANDIDATE = "not a candidate"


@dataclass(frozen=True)
class Form:
    """One formula a candidate may compute: extra arguments of Swap.build, and what the report adds
    (kind: in place of the Swap's kind)."""
    build_kwargs: dict = field(default_factory=dict)
    label: str = ""
    kind: str = ""


@dataclass(frozen=True)
class Swap:
    kind: str                                         # as reported
    flag: str                                         # the patch() argument that enables it
    check: Callable[[nn.Module], str | None]          # None: a candidate; else why not (NOT_A_CANDIDATE: silent)
    build: Callable[..., nn.Module]                   # (original, backend, **form) -> replacement sharing its Parameters
    probe_shape: Callable[[nn.Module], tuple] | None  # input shape for the formula probe; None: no probe
    forms: tuple[Form, ...] = (Form(),)               # tried in order by the probe


SWAPS: list[Swap] = [
    # torch's, then Nemotron's subclass (scale 1 + weight)
    Swap("LayerNorm", "norms", _is_layer_norm, _layer_norm, lambda m: (3, *m.normalized_shape),
         forms=(Form(), Form({"one_plus_weight": True}, "1 + weight"))),
    Swap("RMSNorm", "norms", _is_torch_rms_norm, _torch_rms_norm, lambda m: (3, *m.normalized_shape)),
    # Llama's (weight * normed, the promoted dtype), then OLMo 2's and gpt-oss's (computed in
    # float32, returned in x's dtype), then Gemma's (1 + weight, in float32: also Qwen3-Next,
    # Qwen3.5, VaultGemma...), then T5's (normed in float32, rounded to a 16-bit weight's dtype,
    # the promoted dtype); last a LayerNorm computed in float32 and returned in x's dtype
    # (Cohere's). (They differ in what comes out of mixed dtypes: see _probe.)
    Swap("RMSNorm", "norms", _is_hf_rms_norm, _hf_norm, lambda m: (3, m.weight.shape[0]),
         forms=(Form(), Form({"casting": "float32"}, "in float32"), Form({"weight_offset": 1.0}, "1 + weight"),
                Form({"casting": "t5"}, "T5's casting"), Form({"subtract_mean": True}, "in float32", "LayerNorm"))),
    Swap("LayerNorm, no parameters", "norms", _is_plain_hf_layer_norm, _plain_layer_norm,
         lambda m: (3, *((m.normalized_shape,) if isinstance(m.normalized_shape, int) else m.normalized_shape)),
         forms=(Form({"eps": 1e-5}), Form({"eps": 1e-6}))),
    Swap("Softmax", "softmax", _is_softmax, _softmax, lambda m: (3, 5, 7)),
    # torch's own forward serves what lmfast does not (need_weights=True, add_bias_kv, add_zero_attn):
    # no formula to probe, the calls differ, so tests/test_patch.py proves it on nn.Transformer*.
    Swap("MultiheadAttention", "attention", _is_multihead_attention, _multihead_attention, None),
]


# Mixed dtypes the probe also runs a module with parameters in: (input dtype, parameter dtype).
# Norms that compute the same in float32 differ here (Llama's RMSNorm returns the promoted
# dtype, OLMo 2's the input's), and a replacement must return what the original does.
PROBE_MIXED_DTYPES = ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16))


def _probe(original: nn.Module, swap: Swap) -> tuple[str | None, Form]:
    """(None, the form) for the first of swap.forms whose replacement computes what `original`
    does; else (why not, for the first form, which is the one reported).

    Runs on a deep copy whose floating parameters are redrawn at random (so that identity
    weights cannot hide a different formula), on the CPU, against the replacement built from
    that copy with the reference backend: in float32 (on an input of scale 3 and one of scale
    1e-3, where a norm's eps is as large as the variance, so an eps other than the module's
    fails), then in each of PROBE_MIXED_DTYPES that the original accepts (same output dtype,
    and values within 2 bfloat16 ulps: the two may round differently)."""
    first_why = None
    for form in swap.forms:
        why = _probe_form(original, swap, form)
        if why is None:
            return None, form
        first_why = first_why or why
    return first_why, swap.forms[0]


def _probe_form(original: nn.Module, swap: Swap, form: Form) -> str | None:
    try:
        twin = copy.deepcopy(original).to(device="cpu", dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in twin.parameters():
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            x = torch.randn(*swap.probe_shape(twin), generator=g) * 3 + 1
            x_small = torch.randn(*swap.probe_shape(twin), generator=g) * 1e-3
            replacement = swap.build(twin, "torch", **form.build_kwargs)
            pairs = [(twin(x), replacement(x)), (twin(x_small), replacement(x_small))]
    except Exception as e:  # a module we cannot probe is not one we can vouch for
        return f"could not be probed ({type(e).__name__}: {e})"
    for want, got in pairs:
        if not isinstance(want, torch.Tensor) or want.shape != got.shape:
            return "returns something other than one tensor of the input's shape"
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return (f"computes something other than lmfast.nn.{type(replacement).__name__} "
                    f"(max difference {(got - want).abs().max():.3g} on a probe)")
    # (a module without parameters too: what it returns for a bfloat16 input)
    for x_dtype, param_dtype in PROBE_MIXED_DTYPES:
        mixed = copy.deepcopy(twin).to(param_dtype)
        xm = x.to(x_dtype)
        with torch.no_grad():
            try:
                want = mixed(xm)
            except Exception:  # the original refuses these dtypes: nothing to match
                continue
            try:
                got = swap.build(mixed, "torch", **form.build_kwargs)(xm)
            except Exception as e:
                return f"could not be probed in {x_dtype} with {param_dtype} parameters ({type(e).__name__}: {e})"
        if not isinstance(want, torch.Tensor) or got.dtype != want.dtype:
            return (f"returns {getattr(want, 'dtype', type(want).__name__)} for {x_dtype} input with "
                    f"{param_dtype} parameters, where lmfast.nn.{type(replacement).__name__} returns {got.dtype}")
        if not torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7):
            return (f"computes something other than lmfast.nn.{type(replacement).__name__} for {x_dtype} input "
                    f"with {param_dtype} parameters (max difference {(got.float() - want.float()).abs().max():.3g})")
    return None


# ---- patch / unpatch -------------------------------------------------------------------------

def _children_paths(model: nn.Module):
    """(parent, attribute name, child, dotted path) for every submodule, parents first."""
    for parent_path, parent in model.named_modules():
        for name, child in parent.named_children():
            yield parent, name, child, f"{parent_path}.{name}" if parent_path else name


def patch(model: nn.Module, *, norms: bool = True, attention: bool = True, softmax: bool = True,
          backend: str = "auto") -> PatchReport:
    """Swaps model's modules for lmfast's in place; returns a PatchReport (print it).

    norms: torch.nn.LayerNorm, torch.nn.RMSNorm and Hugging Face *RMSNorm (and bias-free
    *LayerNorm, such as T5's) modules whose formula a probe confirms.
    attention: a transformers model's attn_implementation becomes "lmfast"
    (lmfast.integrations.hf); torch.nn.MultiheadAttention (inside nn.Transformer* or anywhere)
    becomes lmfast.nn.MultiheadAttention. softmax: torch.nn.Softmax modules. Patching twice is
    a no-op; unpatch(model) restores what patch changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .._backends import BACKENDS

    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {('auto', *BACKENDS)}, got {type(backend).__name__}")
    if backend not in ("auto", *BACKENDS):  # (else every forward of the patched model would fail)
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    enabled = {"norms": norms, "attention": attention, "softmax": softmax}
    swaps = [s for s in SWAPS if enabled[s.flag]]
    report = PatchReport()
    for parent, name, child, path in list(_children_paths(model)):
        if hasattr(child, _ORIGINAL):
            report.already_patched += 1
            continue
        for swap in swaps:
            why, form = swap.check(child), swap.forms[0]
            if why == NOT_A_CANDIDATE:
                continue
            if why is None and swap.probe_shape is not None:
                why, form = _probe(child, swap)
            if why is not None:
                report.skipped.append((path, f"{type(child).__name__} {why}"))
                break
            new = swap.build(child, backend, **form.build_kwargs)
            _carry_attributes(child, new)
            new.train(child.training)
            object.__setattr__(new, _ORIGINAL, child)  # not registered as a submodule
            setattr(parent, name, new)
            kind = form.kind or swap.kind
            kind = f"{kind}, {form.label}" if form.label else kind
            report.swapped[f"{kind} ({type(child).__name__})"] += 1
            break
    if attention:
        _patch_hf_attention(model, backend, report)
        _route_torch_transformers_to_lmfast(model, report)
    return report


# torch.nn.TransformerEncoderLayer / TransformerEncoder in inference (eval, no grad) call torch's
# fused kernel with the layer's parameters, bypassing its submodules, and the encoder packs
# padded batches into nested tensors for it. A patched layer must run its lmfast modules, so
# patch turns both off through the attributes torch reads (the layer computes the same thing
# either way), keeping the old values for unpatch.
_SAVED_ATTRS = "_lmfast_saved_attributes"


def _set_saving(module: nn.Module, name: str, value) -> None:
    saved = module.__dict__.setdefault(_SAVED_ATTRS, {})
    saved.setdefault(name, getattr(module, name))
    setattr(module, name, value)


def _route_torch_transformers_to_lmfast(model: nn.Module, report: PatchReport) -> None:
    layers = 0
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and isinstance(m.self_attn, lmnn.MultiheadAttention):
            if _SAVED_ATTRS not in m.__dict__:
                layers += 1
            _set_saving(m, "activation_relu_or_gelu", 0)  # 0 fails the fast-path check; forward uses m.activation
        elif isinstance(m, nn.TransformerEncoder) and any(
                isinstance(layer.self_attn, lmnn.MultiheadAttention) for layer in m.layers):
            _set_saving(m, "use_nested_tensor", False)
    if layers:
        report.notes.append(f"{layers} TransformerEncoderLayer(s): torch's fused inference path is turned off "
                            "so that lmfast's modules run (unpatch turns it back on)")


_PREVIOUS_ATTN = "_lmfast_previous_attn_implementation"  # on a patched transformers model


def _patch_hf_attention(model: nn.Module, backend: str, report: PatchReport) -> None:
    """transformers models: attn_implementation -> "lmfast" (see hf.py)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation") or not hasattr(model, "set_attn_implementation"):
        return  # not a transformers model
    if not hf.register():
        report.skipped.append(("", "attention: transformers is not importable"))
        return
    layers = [m for m in model.modules() if hasattr(m, "is_causal") and type(m).__name__.endswith("Attention")]
    previous = config._attn_implementation
    if previous == hf.NAME:  # patched before, or loaded with attn_implementation="lmfast"
        report.already_patched += len(layers)
    else:
        try:
            model.set_attn_implementation(hf.NAME)
        except (ValueError, ImportError) as e:  # a model whose attention is not pluggable
            report.skipped.append(("", f"attention: transformers refused attn_implementation 'lmfast' ({e})"))
            return
        if config._attn_implementation != hf.NAME:
            # transformers only warns for a model whose attention code does not go through its
            # attention interface (Bloom, say): that code runs as before, so nothing was swapped
            report.skipped.append(("", f"attention: {type(model).__name__} computes attention in its own code, "
                                       "not through transformers' attention interface, so it stays as it is"))
            return
        object.__setattr__(model, _PREVIOUS_ATTN, previous)
        # A layer reads its own config's attn_implementation: older transformers (5.17) set only
        # the model's, not the copies its sub-models hold (T5's encoder and decoder stacks), whose
        # layers then ran on as before; counted as swapped, they were not.
        kept = [layer for layer in layers
                if getattr(getattr(layer, "config", None), "_attn_implementation", hf.NAME) != hf.NAME]
        if kept:
            report.skipped.append(("", f"attention: {len(kept)} of {type(model).__name__}'s attention layers read a "
                                       "config of their own, which this transformers did not switch to 'lmfast' "
                                       f"(transformers {_transformers_version()}): they run as before"))
        served = len(layers) - len(kept)
        if served:
            report.swapped[f"attention (attn_implementation {previous!r} -> {hf.NAME!r})"] += served
    for layer in layers:  # read by hf.attention_forward; a plain attribute, not in state_dict or config
        object.__setattr__(layer, hf.BACKEND_ATTR, backend)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _plain_attributes(module: nn.Module) -> list[str]:
    """The public plain attributes of a module (not parameters, buffers, submodules or tensors):
    eps, normalized_shape, variance_epsilon, a subclass's extras..."""
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and name != "training" and not isinstance(value, (torch.Tensor, nn.Module))]


def _carry_attributes(original: nn.Module, replacement: nn.Module) -> None:
    """Gives the replacement every plain attribute of the original, so that code reading or
    writing one finds it. Those the replacement computes with (eps, variance_epsilon,
    normalized_shape...) it has already, under the same names and meaning; the others are
    copied."""
    for name in _plain_attributes(original):
        if not hasattr(replacement, name):
            setattr(replacement, name, getattr(original, name))


def _carry_back(replacement: nn.Module, original: nn.Module) -> None:
    """unpatch: the original takes back its plain attributes as they are now, so that what was
    written to the replacement (norm.eps = 1e-3) holds after unpatch too."""
    for name in _plain_attributes(original):
        if hasattr(replacement, name):
            setattr(original, name, getattr(replacement, name))


def unpatch(model: nn.Module) -> int:
    """Undoes what patch() did (each swapped module, and the attention implementation);
    returns how many of those it restored."""
    restored = 0
    previous = model.__dict__.pop(_PREVIOUS_ATTN, None)
    if previous is not None:
        model.set_attn_implementation(previous)
        restored += 1
    for m in model.modules():
        m.__dict__.pop(hf.BACKEND_ATTR, None)
        for name, value in m.__dict__.pop(_SAVED_ATTRS, {}).items():
            setattr(m, name, value)
    for parent, name, child, _ in list(_children_paths(model)):
        original = getattr(child, _ORIGINAL, None)
        if original is not None:
            _carry_back(child, original)
            setattr(parent, name, original)
            restored += 1
    return restored
