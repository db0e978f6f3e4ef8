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
chunked attention or a prefix-LM mask fails it and the full mask is used. A full mask that
keeps nothing above the causal diagonal (packed sequences: documents side by side, each
causal) in a batch of one is checked for that exact structure, and the kernel then takes the
documents' boundaries (cu_seqlens) in place of the mask: it reads no mask and skips other
documents' blocks unread. Any other full mask that keeps nothing above the causal diagonal goes
with causal=True, so the kernel skips the blocks above the diagonal unread, and the blocks below
it that the mask drops whole after reading them.
Where the mask is no mask or plain causal and Sq = 1 or Sq = Sk, no mask is built at all
(None, as for SDPA).
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from typing import NamedTuple

import torch

from .. import ops, reference
from .._import_hooks import call_after_import

NAME = "lmfast"
BACKEND_ATTR = "_lmfast_backend"  # on attention layers: the lmfast backend lmfast.patch chose
_STRUCTURE_ATTR = "_lmfast_structure"  # on masks built by _mask: a MaskStructure


class MaskStructure(NamedTuple):
    """A boolean mask that equals `padding & (causal / window band)`, or (full_mask) that lies
    within the causal band, in lmfast's terms."""
    version: int                   # the mask tensor's _version when checked (an in-place edit voids it)
    causal: bool
    window: int | None
    padding: torch.Tensor | None   # (B, 1, 1, Sk) bool, or None if no key is padding
    full_mask: bool = False        # the kernel reads the mask itself, with causal=True (no padding:
    #                                not a reference to the mask, which holds this note)
    documents: torch.Tensor | None = None  # packed sequences, each causal: their cu_seqlens (int32, a
    #                                        batch of one), which the kernel takes in place of the mask


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract: query (B, Hq, Sq, D), key (B, Hkv, Sk, D), value
    (B, Hkv, Sk, Dv) (not repeated for grouped-query attention; Dv != D in DeepSeek's multi-head
    latent attention), returns ((B, Sq, Hq, Dv), None), or the
    attention weights in place of None where the call asks for them (then the model's own eager
    attention computes the call). Per call it does no more than transformers' SDPA path: a few
    dict lookups, then one lmfast op."""
    if kwargs.get("output_attentions") or _attentions_recorded():
        _say_eager_once()
        return _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    for name, arg in kwargs.items():
        if arg is not None and name not in _SERVED_KWARGS and name not in _NEUTRAL_KWARGS:
            # a request lmfast does not know (Inkling 2's per-token `sinks`, a new model's): the
            # model's own eager attention computes it, never lmfast's kernel without it
            _say_unknown_once(type(module).__name__, name)
            return _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                    **kwargs)
    causal, window, documents = False, None, None
    if attention_mask is None:  # from _mask: exactly bottom-right causal, or no mask
        causal = _is_causal(module, is_causal)
    elif not torch.compiler.is_compiling():
        # the structure _mask noted, unless the mask was edited in place since (a compiled graph
        # takes the mask as it is: the note and the tensor's _version are host-side state)
        structure = attention_mask.__dict__.get(_STRUCTURE_ATTR)
        if structure is not None and structure.version == attention_mask._version:
            causal, window, documents = structure.causal, structure.window, structure.documents
            attention_mask = attention_mask if structure.full_mask else structure.padding
    if kwargs.get("position_bias") is not None:  # T5's relative position bias, (1 or B, Hq, Sq, Sk)
        attention_mask = _with_position_bias(kwargs["position_bias"], attention_mask)
    if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)  # additive
    backend = module.__dict__.get(BACKEND_ATTR, "auto")  # set by lmfast.patch
    # attention dropout as the model's eager attention applies it: in training only
    out = ops.attention(query, key, value, attention_mask, causal=causal and query.shape[2] > 1, scale=scaling,
                        window=window, dropout_p=dropout if dropout and module.training else 0.0,
                        sinks=kwargs.get("s_aux"), softcap=kwargs.get("softcap"),  # gpt-oss's sinks, Gemma 2's cap
                        cu_seqlens_q=documents, cu_seqlens_k=documents, backend=backend)
    return out.transpose(1, 2).contiguous(), None  # (B, Sq, Hq, Dv) (no copy: the kernels write o so)


# The attention-function keyword arguments lmfast computes with (output_attentions: the eager
# path above) ...
_SERVED_KWARGS = frozenset({"position_bias", "s_aux", "softcap", "output_attentions"})
# ... and those that do not change what attention computes, as transformers' SDPA path ignores
# them: the model-wide keyword arguments transformers passes down to every layer (its
# TransformersKwargs; varlen and packing bookkeeping for flash kernels), a window the mask
# function has applied already, and arguments that the models' own eager attention ignores
# (DeepSeek V3.2's sparse `indices`, MiniMax M3's `block_indices`, ModernBERT's flash-only
# `deterministic`). Anything else not None goes to the model's eager attention.
_NEUTRAL_KWARGS = frozenset({
    "num_items_in_batch", "output_hidden_states", "output_router_logits", "cu_seq_lens_q", "cu_seq_lens_k",
    "max_length_q", "max_length_k", "position_ids", "seq_idx", "sliding_window", "use_cache", "cache_position",
    "indices", "block_indices", "deterministic"})


@functools.cache
def _say_unknown_once(layer: str, name: str) -> None:
    _log.warning(f"lmfast: {layer} passes the attention function `{name}`, which lmfast does not compute with; "
                 "the model's eager attention computes such calls")


def _with_position_bias(bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """T5-style relative position bias as one additive mask with the call's mask folded in, as
    transformers' SDPA path folds them (a False entry -inf, an additive mask added); a causal
    band stays the kernel's `causal` (its blocks skipped). Differentiable in the bias (T5 learns
    it), through the kernels' mask gradient."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, float("-inf"))
    return bias + mask


def _is_causal(module: torch.nn.Module, is_causal: bool | None) -> bool:
    """The call's is_causal, else the layer's (as transformers' SDPA path decides)."""
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))


# ---- calls that ask for the attention weights ---------------------------------------------------
# transformers returns `outputs.attentions` by recording the second output of each attention
# layer while its output collector holds an "attentions" list (output_attentions=True, or
# config.output_attentions); some models also pass output_attentions to the attention function.
# Such a call runs the model's own eager attention, which returns the weights; lmfast never
# returns less than was asked for.

_output_collector = None  # transformers' collector of recorded outputs (found by register())


def _attentions_recorded() -> bool:
    collector = _output_collector
    if collector is None:
        return False
    if torch.compiler.is_compiling():
        # torch.compile cannot trace a ContextVar; transformers' collector then keeps its value
        # in a plain attribute, where it was set inside the compiled region. (Set outside it,
        # as when only a decoder layer is compiled, the request is out of the graph's sight.)
        recording = collector.global_var if collector.compiling else None
    else:
        recording = collector.get()
    return bool(recording) and "attentions" in recording


_log = logging.getLogger("lmfast")


@functools.cache
def _say_eager_once() -> None:
    _log.warning("lmfast: a call asked for attention weights (output_attentions); the model's eager attention "
                 "computes such calls, lmfast attention the others")


def _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    """The call as the model's eager attention computes it (its module's eager_attention_forward,
    else a plain one), with the mask it expects: additive, and explicit where _mask left it out."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None) or _plain_eager
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and _is_causal(module, is_causal) and q_len > 1:
        attention_mask = reference.attention_keep(q_len, k_len, True, None, query.device)[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~attention_mask, torch.finfo(query.dtype).min)
    kwargs.pop("output_attentions", None)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _plain_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """softmax(q k^T * scaling + mask) v, with grouped-query kv heads repeated: ((B, Sq, Hq, D), weights)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask[..., :key.shape[2]]
    weights = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


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
    per_key = q_length == 1 and local_size is None  # decoding without a window: (B, 1, 1, Sk) already
    if mask is not None and not per_key and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        # (A single query's mask is one value per key, which the kernel reads as it is: a
        # decoding step pays no check, unless a window lets the kernel skip the keys before it.
        # Compiled graphs get the plain mask: the check reads mask values on the host.)
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
    documents = _packed_documents(mask, padding, kv_offset, window)
    if documents is not None:
        return MaskStructure(mask._version, True, window, None, documents=documents)
    causal_band = reference.attention_keep(q_length, kv_length, True, None, mask.device)  # (Sq, Sk)
    if window is None and q_length > 1 and not bool((mask & ~causal_band).any()):
        return MaskStructure(mask._version, True, None, None, full_mask=True)
    return None


def _packed_documents(mask: torch.Tensor, padding: torch.Tensor | None, kv_offset: int,
                      window: int | None) -> torch.Tensor | None:
    """The cu_seqlens (int32) of the documents that `mask` (1, 1, S, S) packs, each causal (and
    windowed, as the model asks) and unpadded, as transformers builds them from position ids that
    restart at 0; None if the mask is anything else. Each row's first kept key is its
    document's first token; the documents are then rebuilt from those and compared, exactly."""
    batch, _, q_length, kv_length = mask.shape
    if batch != 1 or q_length != kv_length or q_length < 2 or kv_offset != 0 or (
            padding is not None and not bool(padding.all())):
        return None
    rows = mask[0, 0]
    first = rows.int().argmax(-1)  # (S,) each row's first kept key (0 where none)
    i = torch.arange(q_length, device=mask.device)
    cu = torch.cat([torch.nonzero(first == i).flatten(), i.new_tensor([q_length])]).to(torch.int32)
    if cu[0] != 0 or cu.numel() < 3:  # (one document: plain causal, matched before)
        return None
    expected = reference.documents_keep(cu, cu, True, window, mask.device)
    return cu if torch.equal(rows, expected) else None


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
    global _output_collector
    try:
        from transformers.utils.output_capturing import _active_collector as _output_collector
    except ImportError:  # a transformers without it records no attention weights this way
        _output_collector = None
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
