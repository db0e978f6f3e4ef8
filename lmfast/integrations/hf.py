"""Hugging Face transformers integration: lmfast as an attention implementation.

Registers "lmfast" in transformers' attention-function registry and, beside it, a mask
function in its attention-mask registry (without one, a custom attention function receives
no padding mask). Registration happens as soon as transformers' modeling code is imported
(an import hook installed by `import lmfast`), so `from_pretrained(...,
attn_implementation="lmfast")` works without calling lmfast.patch first.

Masks. The mask function builds SDPA's boolean (B, 1, Sq, Sk) mask (True = keep, as lmfast's),
then checks whether it is exactly causal (bottom-right, as lmfast's `causal`), optionally with
a sliding `window`, and a per-key padding mask. If so it notes that structure on the mask, and
the attention function calls the kernel with causal=/window= and a (B, 1, 1, Sk) padding mask,
so the kernel skips blocks outside the band instead of reading (Sq x Sk) mask values. The
check is exact, not a guess from arguments: a prefill into a static cache (top-left causal),
chunked attention or a prefix-LM mask fails it and the full mask is used. Where the mask is
no mask or plain causal and Sq = 1 or Sq = Sk, no mask is built at all (None, as for SDPA).
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch

from .. import ops, reference
from .._import_hooks import call_after_import

NAME = "lmfast"
BACKEND_ATTR = "_lmfast_backend"  # on attention layers: the lmfast backend lmfast.patch chose
_STRUCTURE_ATTR = "_lmfast_structure"  # on masks built by _mask: a MaskStructure


class MaskStructure(NamedTuple):
    """A boolean mask that equals `padding & (causal / window band)`, in lmfast's terms."""
    version: int                   # the mask tensor's _version when checked (an in-place edit voids it)
    causal: bool
    window: int | None
    padding: torch.Tensor | None   # (B, 1, 1, Sk) bool, or None if no key is padding


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D)
    (not repeated for grouped-query attention), returns ((B, Sq, Hq, D), None)."""
    if (dropout and module.training) or kwargs.get("position_bias") is not None:
        # what lmfast does not compute (attention dropout, T5-style position bias): transformers'
        # own SDPA path, with the same mask (a full mask, or None exactly where SDPA's is None too)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    for unsupported in ("softcap", "s_aux"):  # (lmfast.patch leaves models with these alone)
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"lmfast attention does not support {unsupported}")
    causal, window = False, None
    if attention_mask is None:  # from _mask: exactly bottom-right causal, or no mask
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    else:
        structure = getattr(attention_mask, _STRUCTURE_ATTR, None)
        if structure is not None and structure.version == attention_mask._version:
            causal, window, attention_mask = structure.causal, structure.window, structure.padding
        elif attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)  # additive
    backend = getattr(module, BACKEND_ATTR, "auto")  # set by lmfast.patch
    out = ops.attention(query, key, value, attention_mask, causal=causal and query.shape[2] > 1,
                        scale=scaling, window=window, backend=backend)
    return out.transpose(1, 2).contiguous(), None  # (B, Sq, Hq, D)


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, local_size=None,
          allow_is_causal_skip=True, **kwargs):
    """transformers' mask-function contract (see masking_utils.sdpa_mask): SDPA's boolean mask,
    with its structure noted where it has one; None where that mask is no mask, or exactly
    causal with Sq = 1 or Sq = Sk. (SDPA's own skip also covers a prefill into an empty static
    cache, Sq < Sk with top-left causal alignment, which bottom-right is not.)"""
    from transformers.masking_utils import sdpa_mask

    skip = allow_is_causal_skip and (q_length == 1 or q_length == kv_length)
    mask = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=skip, **kwargs)
    if mask is not None and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        # (compiled graphs get the plain mask: the check reads mask values on the host)
        structure = _structure(mask, attention_mask, kv_length, kv_offset, local_size)
        if structure is not None:
            setattr(mask, _STRUCTURE_ATTR, structure)
    return mask


def _structure(mask: torch.Tensor, attention_mask: torch.Tensor | None, kv_length: int, kv_offset,
               window: int | None) -> MaskStructure | None:
    """The MaskStructure that `mask` (B, 1, Sq, Sk) exactly equals, or None."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or not isinstance(kv_offset, int):
        return None
    batch, _, q_length, _ = mask.shape
    padding = None  # (B, 1, 1, Sk): the 2-D padding mask over this call's keys, as sdpa_mask reads it
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
            return None
        from transformers.masking_utils import prepare_padding_mask  # (pads it to kv_offset + kv_length)

        padding = prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)
        padding = padding[:, kv_offset:kv_offset + kv_length].reshape(batch, 1, 1, kv_length)
    candidates = [(True, window)] if window is not None else [(True, None), (False, None)]
    for causal, win in candidates:
        expected = reference.attention_keep(q_length, kv_length, causal, win, mask.device)
        if expected is None:
            expected = torch.ones((), dtype=torch.bool, device=mask.device)
        if padding is not None:
            expected = expected & padding
        if torch.equal(mask, expected.expand(mask.shape)):
            if padding is not None and bool(padding.all()):
                padding = None
            return MaskStructure(mask._version, causal, win, padding)
    return None


@functools.cache
def register() -> bool:
    """Registers "lmfast" with transformers (once); False if transformers is not importable."""
    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return True


# ---- registration when transformers loads ----------------------------------------------------
# Importing transformers' registries costs seconds, so `import lmfast` does not; it registers
# right after the program itself imports transformers' modeling code.

_MODELING = "transformers.modeling_utils"


def _register_quietly() -> None:
    try:
        register()
    except Exception as e:  # never break the user's import of transformers
        warnings.warn(f"lmfast could not register its attention with transformers: {e!r}; "
                      "call lmfast.integrations.hf.register() to see why", stacklevel=2)


def register_when_transformers_loads() -> None:
    """Registers now if transformers' modeling code is loaded, else as soon as it is."""
    call_after_import(_MODELING, _register_quietly)
