"""lmfast.integrations.flash_attn: flash-attn 2's functional API (flash_attn_func,
flash_attn_varlen_func) on every kernel backend, against flash-attn's own definition of each
argument (its layouts, bottom-right causal alignment, window_size=(left, right) inclusive)."""

import pytest
import torch

from lmfast import reference
from lmfast.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func
from lmfast.testing import check_against_reference


def _flash_keep(Sq, Sk, causal, window_size):
    """flash-attn's masking, as its docs define it: query i sees keys j with
    i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1: unbounded); causal sets right = 0."""
    left, right = window_size
    right = 0 if causal else right
    p = torch.arange(Sq)[:, None] + Sk - Sq
    j = torch.arange(Sk)[None, :]
    keep = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= p - left
    if right >= 0:
        keep &= j <= p + right
    return keep


def _reference_bshd(q, k, v, keep, scale=None, softcap=None):
    o, _ = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), keep.to(q.device),
                               scale=scale, softcap=softcap)
    return o.transpose(1, 2)


@pytest.mark.parametrize("causal,window_size", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, -1)),
                                                (False, (-1, 0)), (False, (3, 0)), (True, (4, -1)), (True, (0, 0))])
def test_flash_attn_func_matches_flash_attns_definition(kb, causal, window_size):
    g = torch.Generator().manual_seed(0)
    B, Sq, Sk, Hq, Hkv, D = 2, 19, 27, 4, 2, 16
    ins = {"q": torch.randn(B, Sq, Hq, D, generator=g).to(kb.device),
           "k": torch.randn(B, Sk, Hkv, D, generator=g).to(kb.device),
           "v": torch.randn(B, Sk, Hkv, D, generator=g).to(kb.device)}
    keep = _flash_keep(Sq, Sk, causal, window_size)
    check_against_reference(
        lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window_size,
                                        softcap=2.0, backend=kb.name),
        lambda q, k, v: _reference_bshd(q, k, v, keep, scale=0.3, softcap=2.0), ins, grad=("q", "k", "v"),
        name=f"flash_attn_func {kb.name} causal={causal} window_size={window_size}")


@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (False, (-1, -1)), (True, (6, -1))])
def test_flash_attn_varlen_func_is_each_document_alone(kb, causal, window_size):
    """The packed call equals flash_attn_func on each document alone (bottom-right alignment
    per document: its queries are its last tokens)."""
    g = torch.Generator().manual_seed(1)
    lens_q, lens_k = [5, 17, 1, 9], [5, 20, 7, 9]
    Hq, Hkv, D = 4, 2, 16
    q = torch.randn(sum(lens_q), Hq, D, generator=g).to(kb.device)
    k = torch.randn(sum(lens_k), Hkv, D, generator=g).to(kb.device)
    v = torch.randn(sum(lens_k), Hkv, D, generator=g).to(kb.device)
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=kb.device)
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=kb.device)
    out = flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal, window_size=window_size,
                                 backend=kb.name)
    assert out.shape == (sum(lens_q), Hq, D)
    for d in range(len(lens_q)):
        qs, ks = slice(cq[d], cq[d + 1]), slice(ck[d], ck[d + 1])
        alone = flash_attn_func(q[None, qs], k[None, ks], v[None, ks], causal=causal, window_size=window_size,
                                backend=kb.name)[0]
        torch.testing.assert_close(out[qs], alone, rtol=1e-5, atol=1e-5)


def test_what_lmfast_does_not_compute_is_refused():
    q = torch.randn(1, 4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="alibi_slopes"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="return_attn_probs=True"):
        flash_attn_func(q, q, q, return_attn_probs=True)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"window_size=\(2, 3\)"):
        flash_attn_func(q, q, q, window_size=(2, 3))
    with pytest.raises(ValueError, match="window_size must be a pair"):
        flash_attn_func(q, q, q, window_size=4)
