"""lmfast.patch / lmfast.unpatch: swap a model's modules for lmfast's, in place.

One table (NORM_SWAPS) says which modules are candidates and how to build the replacement.
A candidate is swapped only if a probe shows it computes what the replacement computes: the
probe runs a copy of the module, with random parameters, against the replacement sharing
those parameters. So a look-alike with another formula (Gemma's RMSNorm scales by
1 + weight) is left alone and reported, never silently changed.

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

_ORIGINAL = "_lmfast_original"  # attribute of a replacement: the module it replaced


@dataclass
class PatchReport:
    """What patch() did: swapped modules per kind, and the candidates it left alone, with why."""
    swapped: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)
    already_patched: int = 0

    def __str__(self) -> str:
        done = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.swapped.items())) or "nothing swapped"
        lines = [f"lmfast.patch: {done}"]
        if self.already_patched:
            lines.append(f"  already patched: {self.already_patched} modules")
        for path, why in self.skipped:
            lines.append(f"  skipped {path or '(model)'}: {why}")
        return "\n".join(lines)


# ---- the swap table --------------------------------------------------------------------------

def _layer_norm(module: nn.LayerNorm, backend: str) -> nn.Module:
    new = lmnn.LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                         bias=module.bias is not None, backend=backend, device="meta")
    new.weight, new.bias = module.weight, module.bias  # the same Parameters (or None)
    return new


def _rms_norm(module: nn.Module, backend: str) -> nn.Module:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    new = lmnn.RMSNorm(module.weight.shape[0], eps=float(eps), backend=backend, device="meta")
    new.weight = module.weight
    return new


def _is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and not isinstance(module, lmnn.LayerNorm)


def _is_hf_rms_norm(module: nn.Module) -> bool:
    """Hugging Face style RMSNorm: a class named *RMSNorm with a 1-D `weight` and an epsilon."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and not isinstance(module, lmnn.RMSNorm)
            and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", getattr(module, "eps", None)), float))


# (kind reported, is it a candidate, build the replacement)
NORM_SWAPS: list[tuple[str, Callable[[nn.Module], bool], Callable[[nn.Module, str], nn.Module]]] = [
    ("LayerNorm", _is_layer_norm, _layer_norm),
    ("RMSNorm", _is_hf_rms_norm, _rms_norm),
]


def _probe(original: nn.Module, build: Callable[[nn.Module, str], nn.Module]) -> str | None:
    """None if `build(original)` computes what `original` does; else why not.

    Runs on a deep copy whose floating parameters are redrawn at random (so that identity
    weights cannot hide a different formula), in float32 on the CPU, against the replacement
    built from that copy with the reference backend."""
    try:
        twin = copy.deepcopy(original).to(device="cpu", dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in twin.parameters():
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            hidden = twin.weight.shape if getattr(twin, "weight", None) is not None else original.normalized_shape
            x = torch.randn(3, *hidden, generator=g) * 3 + 1
            want = twin(x)
            replacement = build(twin, "torch")
            got = replacement(x)
    except Exception as e:  # a module we cannot probe is not one we can vouch for
        return f"could not be probed ({type(e).__name__}: {e})"
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return "returns something other than one tensor of the input's shape"
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        return (f"computes something other than lmfast.nn.{type(replacement).__name__} "
                f"(max difference {(got - want).abs().max():.3g} on a probe)")
    return None


# ---- patch / unpatch -------------------------------------------------------------------------

def _children_paths(model: nn.Module):
    """(parent, attribute name, child, dotted path) for every submodule, parents first."""
    for parent_path, parent in model.named_modules():
        for name, child in parent.named_children():
            yield parent, name, child, f"{parent_path}.{name}" if parent_path else name


def patch(model: nn.Module, *, norms: bool = True, attention: bool = True, softmax: bool = True,
          backend: str = "auto") -> PatchReport:
    """Swaps model's norm modules for lmfast's in place; returns a PatchReport (print it).

    norms: torch.nn.LayerNorm and Hugging Face *RMSNorm modules whose formula a probe
    confirms. attention: a transformers model's attn_implementation becomes "lmfast"
    (lmfast.integrations.hf); torch.nn.MultiheadAttention is not swapped yet. softmax: not
    implemented yet. Patching twice is a no-op; unpatch(model) restores what patch changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    if norms:
        for parent, name, child, path in list(_children_paths(model)):
            if hasattr(child, _ORIGINAL):
                report.already_patched += 1
                continue
            for kind, is_candidate, build in NORM_SWAPS:
                if not is_candidate(child):
                    continue
                why = _probe(child, build)
                if why is not None:
                    report.skipped.append((path, f"{type(child).__name__} {why}"))
                    break
                new = build(child, backend)
                new.train(child.training)
                object.__setattr__(new, _ORIGINAL, child)  # not registered as a submodule
                setattr(parent, name, new)
                report.swapped[f"{kind} ({type(child).__name__})"] += 1
                break
    if attention:
        _patch_hf_attention(model, backend, report)
    if softmax:
        report.skipped.append(("", "softmax swapping is not implemented yet (issue 4 in progress)"))
    return report


_PREVIOUS_ATTN = "_lmfast_previous_attn_implementation"  # on a patched transformers model


def _patch_hf_attention(model: nn.Module, backend: str, report: PatchReport) -> None:
    """transformers models: attn_implementation -> "lmfast" (see hf.py); others: reported."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation") or not hasattr(model, "set_attn_implementation"):
        report.skipped.append(("", "attention: not a Hugging Face transformers model; torch.nn.MultiheadAttention "
                                   "swapping is not implemented yet (issue 4 in progress)"))
        return
    from . import hf

    if not hf.register():
        report.skipped.append(("", "attention: transformers is not importable"))
        return
    layers = [m for m in model.modules() if hasattr(m, "is_causal") and type(m).__name__.endswith("Attention")]
    for layer in layers:  # read by hf.attention_forward; a plain attribute, not in state_dict or config
        object.__setattr__(layer, hf.BACKEND_ATTR, backend)
    previous = config._attn_implementation
    if previous == hf.NAME:
        report.already_patched += len(layers)
        return
    model.set_attn_implementation(hf.NAME)
    object.__setattr__(model, _PREVIOUS_ATTN, previous)
    report.swapped[f"attention (attn_implementation {previous!r} -> {hf.NAME!r})"] += len(layers)


def unpatch(model: nn.Module) -> int:
    """Undoes what patch() did (each swapped module, and the attention implementation);
    returns how many of those it restored."""
    restored = 0
    previous = model.__dict__.pop(_PREVIOUS_ATTN, None)
    if previous is not None:
        from . import hf

        model.set_attn_implementation(previous)
        restored += 1
        for m in model.modules():
            m.__dict__.pop(hf.BACKEND_ATTR, None)
    for parent, name, child, _ in list(_children_paths(model)):
        original = getattr(child, _ORIGINAL, None)
        if original is not None:
            setattr(parent, name, original)
            restored += 1
    return restored
