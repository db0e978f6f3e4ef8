"""Attention: the reference's semantics (checked against SDPA where they coincide and against
a per-query loop where they do not), the public op's validation, and its gradients. The flash
kernels themselves are checked against this reference in test_attention_kernels.py."""

import math

import pytest
import torch
import torch.nn.functional as F

import lmfast
from lmfast import reference
from lmfast._backends import resolve


def _qkv(B=2, Hq=4, Hkv=2, Sq=5, Sk=7, D=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, Sq, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Sk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Sk, D, generator=g, dtype=dtype))


def _loop_attention(q, k, v, keep, scale):
    """Per (b, h, i): softmax over the keys `keep[b, h, i]` allows, written as plainly as it gets."""
    B, Hq, Sq, D = q.shape
    group = Hq // k.shape[1]
    o = torch.zeros_like(q)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=q.dtype)
    for b in range(B):
        for h in range(Hq):
            for i in range(Sq):
                js = [j for j in range(k.shape[2]) if keep[b, h, i, j]]
                if not js:
                    continue
                s = torch.stack([scale * (q[b, h, i] @ k[b, h // group, j]) for j in js])
                lse[b, h, i] = torch.logsumexp(s, 0)
                o[b, h, i] = (torch.softmax(s, 0)[:, None] * v[b, h // group, js]).sum(0)
    return o, lse


def test_reference_matches_sdpa_where_semantics_coincide():
    q, k, v = _qkv(Hkv=4, Sq=6, Sk=6)
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True  # SDPA gives NaN for fully masked rows
    add = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for kwargs, sdpa_kwargs in [({}, {}), ({"attn_mask": mask}, {"attn_mask": mask}),
                                ({"attn_mask": add}, {"attn_mask": add}),
                                ({"causal": True}, {"is_causal": True}),  # Sq == Sk: both alignments agree
                                ({"scale": 0.3}, {"scale": 0.3})]:
        o, _ = reference.attention(q, k, v, **kwargs)
        torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs))


def test_reference_grouped_query_heads_match_repeated_kv():
    q, k, v = _qkv(Hq=6, Hkv=2)
    o, lse = reference.attention(q, k, v)
    o_rep, lse_rep = reference.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close((o, lse), (o_rep, lse_rep))


@pytest.mark.parametrize("Sq,Sk", [(1, 9), (4, 9), (9, 9), (9, 4)])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, 3), (False, None)])
def test_reference_positions_match_a_per_query_loop(Sq, Sk, causal, window):
    q, k, v = _qkv(Hq=2, Hkv=1, Sq=Sq, Sk=Sk, D=8)
    pad = torch.rand(2, 1, 1, Sk) > 0.2
    keep = pad.expand(2, 2, Sq, Sk).clone()
    for i in range(Sq):
        p = i + Sk - Sq  # query i's key position (bottom-right aligned)
        for j in range(Sk):
            if (causal and j > p) or (window is not None and j <= p - window):
                keep[:, :, i, j] = False
    got = reference.attention(q, k, v, pad, causal, None, window)
    torch.testing.assert_close(got, _loop_attention(q, k, v, keep, 8 ** -0.5))


def test_decoding_query_sees_every_key():
    q, k, v = _qkv(Sq=1, Sk=33)
    torch.testing.assert_close(reference.attention(q, k, v, causal=True), reference.attention(q, k, v))


def test_fully_masked_rows_and_empty_keys_give_zeros():
    q, k, v = _qkv(Sq=6, Sk=4)  # causal: the first 2 queries see no key
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o, lse = lmfast.ops.attention(q, k, v, causal=True, return_lse=True, backend="torch")
    assert torch.count_nonzero(o[:, :, :2]) == 0 and torch.isneginf(lse[:, :, :2]).all()
    grads = torch.autograd.grad(o.sum() + lse[:, :, 2:].sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads) and torch.count_nonzero(grads[0][:, :, :2]) == 0
    q0, k0, v0 = _qkv(Sk=0)
    o0, lse0 = lmfast.ops.attention(q0, k0, v0, return_lse=True, backend="torch")
    assert o0.shape == q0.shape and torch.count_nonzero(o0) == 0 and torch.isneginf(lse0).all()


def test_op_matches_reference_and_returns_float32_lse():
    q, k, v = _qkv(dtype=torch.bfloat16)
    mask = torch.rand(2, 1, 5, 7) > 0.2
    o, lse = lmfast.ops.attention(q, k, v, mask, causal=True, window=4, return_lse=True, backend="torch")
    want_o, want_lse = reference.attention(q, k, v, mask, True, None, 4)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (2, 4, 5)
    torch.testing.assert_close((o, lse), (want_o, want_lse))


def test_gradients_including_an_additive_mask():
    q, k, v = (t.requires_grad_() for t in _qkv())
    bias = torch.randn(1, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, bias: lmfast.ops.attention(q, k, v, bias, causal=True, backend="torch"), (q, k, v, bias))


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    q, k, v = _qkv(dtype=torch.float32)
    assert resolve("auto", "attention", q.device, q.dtype) == "cpu"
    torch.testing.assert_close(lmfast.ops.attention(q, k, v), reference.attention(q, k, v)[0])


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "triton"])
def test_bad_inputs_name_the_argument(backend):
    """The same errors from the Python checks (torch, triton) and the C++ public op (auto, cpu)."""
    def _raises(exc, match, *args, **kwargs):
        with pytest.raises(exc, match=match):
            lmfast.ops.attention(*args, **kwargs, backend=backend)

    q, k, v = _qkv(dtype=torch.float32)
    _raises(ValueError, r"q must have 4 dims \(B, H, S, D\)", q[0], k, v)
    _raises(TypeError, "k must be a float16", q, k.long(), v)
    _raises(TypeError, "v has dtype torch.float16 but q has dtype torch.float32", q, k, v.half())
    _raises(ValueError, "k is on meta but q is on cpu", q, k.to("meta"), v)
    _raises(ValueError, "k has head dim 8 but q has 16", q, k[..., :8], v[..., :8])
    _raises(ValueError, r"k and v must have the same \(B, Hkv, Sk\)", q, k, v[:, :, :3])
    _raises(ValueError, "q's 4 heads must be a multiple of k's and v's 3 heads", q,
            torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16))
    _raises(ValueError, "k and v have batch size 1 but q has 2", q, k[:1], v[:1])
    _raises(ValueError, r"attn_mask of shape \(3, 7\) does not broadcast to \(B, Hq, Sq, Sk\) = \(2, 4, 5, 7\)",
            q, k, v, torch.ones(3, 7, dtype=torch.bool))
    _raises(TypeError, "additive attn_mask has dtype torch.float64", q, k, v, torch.zeros(5, 7, dtype=torch.float64))
    _raises(ValueError, "window must be >= 1", q, k, v, window=0)
    _raises(TypeError, "window must be an int or None, got float", q, k, v, window=2.0)
    _raises(TypeError, "causal must be a bool", q, k, v, causal="yes")
    _raises(ValueError, "scale must be finite", q, k, v, scale=math.inf)
