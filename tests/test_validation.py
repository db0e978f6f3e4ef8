"""Bad input raises ValueError / TypeError naming the argument, on every backend, before any
kernel runs."""

import pytest
import torch

import lmfast

BACKENDS = ["auto", "torch", "cpu", "triton"]
x = torch.randn(4, 8)


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [lmfast.ops.layer_norm, lmfast.ops.rms_norm])
def test_norm_bad_inputs(op, backend):
    kw = {"backend": backend}
    _raises(TypeError, "x must be a torch.Tensor", op, [[1.0]], **kw)
    _raises(TypeError, r"x must be a float16, bfloat16, float32 or float64 tensor, got torch.int64",
            op, torch.ones(2, 3, dtype=torch.long), **kw)
    _raises(ValueError, "x must have at least one dimension", op, torch.tensor(1.0), **kw)
    _raises(ValueError, r"weight must have shape \(8,\)", op, x, torch.ones(7), **kw)
    _raises(ValueError, r"weight must have shape \(8,\)", op, x, torch.ones(1, 8), **kw)
    _raises(TypeError, "weight has dtype torch.float16 but x has dtype torch.float32", op, x,
            torch.ones(8, dtype=torch.float16), **kw)
    _raises(ValueError, "weight is on meta but x is on cpu", op, x, torch.ones(8, device="meta"), **kw)
    _raises(ValueError, r"residual must have x's shape \(4, 8\)", op, x, residual=torch.ones(8), **kw)
    _raises(TypeError, "residual has dtype", op, x, residual=x.half(), **kw)
    _raises(ValueError, "eps must be >= 0.0, got -1e-05", op, x, None, eps=-1e-5, **kw)
    _raises(ValueError, "eps must be finite", op, x, None, eps=float("nan"), **kw)
    _raises(TypeError, "eps must be a real number, got str", op, x, None, eps="1e-5", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_bad_weight_offset(backend):
    rms, w = lmfast.ops.rms_norm, torch.ones(8)
    _raises(ValueError, "weight_offset must be finite, got nan", rms, x, w, weight_offset=float("nan"), backend=backend)
    _raises(TypeError, "weight_offset must be a real number, got str", rms, x, w, weight_offset="1", backend=backend)
    _raises(ValueError, r"weight_offset=1(\.0)? needs a weight", rms, x, weight_offset=1.0, backend=backend)


def test_layer_norm_bias_checked_too():
    _raises(ValueError, r"bias must have shape \(8,\)", lmfast.ops.layer_norm, x, None, torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_bad_inputs(backend):
    kw = {"backend": backend}
    sm = lmfast.ops.softmax
    _raises(TypeError, "x must be a float16", sm, torch.ones(3, dtype=torch.int32), **kw)
    _raises(ValueError, "dim=2 is out of range for x with 2 dims", sm, x, 2, **kw)
    _raises(TypeError, "dim must be an int", sm, x, 1.0, **kw)
    _raises(ValueError, r"mask of shape \(3,\) does not broadcast to x's shape \(4, 8\)", sm, x, mask=torch.ones(3), **kw)
    _raises(ValueError, r"mask of shape \(2, 4, 8\) does not broadcast", sm, x, mask=torch.ones(2, 4, 8), **kw)
    _raises(TypeError, "mask must be boolean .* or additive float, got torch.int64", sm, x,
            mask=torch.ones(8, dtype=torch.long), **kw)
    _raises(TypeError, "additive mask has dtype torch.float16 but x has torch.float32", sm, x,
            mask=torch.ones(8, dtype=torch.float16), **kw)
    _raises(ValueError, "mask is on meta but x is on cpu", sm, x, mask=torch.ones(8, device="meta"), **kw)
    _raises(ValueError, "scale must be finite", sm, x, scale=float("inf"), **kw)
    _raises(TypeError, "scale must be a real number", sm, x, scale=None, **kw)
    _raises(ValueError, "causal=True .* needs dim=-1", sm, x, 0, causal=True, **kw)
    _raises(ValueError, "causal=True .* needs dim=-1 and x with >= 2 dims", sm, torch.randn(5), causal=True, **kw)
    _raises(TypeError, "causal must be a bool", sm, x, causal=1, **kw)


def test_unknown_backend_names_the_argument():
    _raises(ValueError, "backend must be one of", lmfast.ops.softmax, x, backend="gpu")
    _raises(TypeError, "backend must be a str", lmfast.ops.layer_norm, x, backend=["cpu"])


def test_env_override_is_validated(set_backend_env):
    set_backend_env("fast")
    _raises(ValueError, "LMFAST_BACKEND must be one of", lmfast.ops.rms_norm, x)


def test_backend_that_cannot_serve_the_tensor():
    _raises(ValueError, "backend 'cpu' runs on CPU tensors, got a tensor on meta",
            lmfast.ops.rms_norm, torch.randn(2, 4, device="meta"), backend="cpu")
    _raises(TypeError, "backend 'triton' supports float16, bfloat16 and float32, got torch.float64",
            lmfast.ops.softmax, x.double(), backend="triton")
    _raises(RuntimeError, "backend 'cuda' is not available", lmfast.ops.softmax, x, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_dropout_bad_inputs(backend):
    q, kv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8)
    at = lmfast.ops.attention
    kw = {"backend": backend}
    _raises(ValueError, r"dropout_p must be in \[0, 1\), got 1", at, q, kv, kv, dropout_p=1.0, **kw)
    _raises(ValueError, r"dropout_p must be in \[0, 1\), got -0.5", at, q, kv, kv, dropout_p=-0.5, **kw)
    _raises(ValueError, "dropout_p must be finite", at, q, kv, kv, dropout_p=float("nan"), **kw)
    _raises(TypeError, "dropout_p must be a real number", at, q, kv, kv, dropout_p=None, **kw)
    _raises(TypeError, "dropout_seed must be an int64 tensor, got torch.int32", at, q, kv, kv, dropout_p=0.5,
            dropout_seed=torch.ones(1, dtype=torch.int32), **kw)
    _raises(ValueError, r"dropout_seed must .*one element", at, q, kv, kv, dropout_p=0.5,
            dropout_seed=torch.ones(3, dtype=torch.long), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_documents_bad_inputs(backend):
    """cu_seqlens_q / cu_seqlens_k (packed documents): both or neither, int32/int64 of shape
    (n + 1,) on q's device, one length, q a batch of one (the values: test_attention_kernels)."""
    q, kv = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 7, 8)
    at = lmfast.ops.attention
    cq, ck = torch.tensor([0, 2, 6]), torch.tensor([0, 3, 7])
    kw = {"backend": backend}
    _raises(ValueError, "cu_seqlens_q and cu_seqlens_k go together: pass both or neither", at, q, kv, kv,
            cu_seqlens_q=cq, **kw)
    _raises(ValueError, "cu_seqlens_q and cu_seqlens_k go together", at, q, kv, kv, cu_seqlens_k=ck, **kw)
    _raises(TypeError, "cu_seqlens_q must be an int32 or int64 tensor, got torch.float32", at, q, kv, kv,
            cu_seqlens_q=cq.float(), cu_seqlens_k=ck, **kw)
    _raises(ValueError, r"cu_seqlens_k must have shape \(n \+ 1,\) for n documents, got shape \(1, 3\)", at, q, kv,
            kv, cu_seqlens_q=cq, cu_seqlens_k=ck[None], **kw)
    _raises(ValueError, r"cu_seqlens_q must have shape \(n \+ 1,\) for n documents, got shape \(0,\)", at, q, kv,
            kv, cu_seqlens_q=cq[:0], cu_seqlens_k=ck, **kw)
    _raises(ValueError, "cu_seqlens_q is on meta but q is on cpu; both must be on one device", at, q, kv, kv,
            cu_seqlens_q=cq.to("meta"), cu_seqlens_k=ck, **kw)
    _raises(ValueError, r"cu_seqlens_q and cu_seqlens_k must have the same length \(n \+ 1 for n documents\), "
            "got 3 and 2", at, q, kv, kv, cu_seqlens_q=cq, cu_seqlens_k=ck[:2], **kw)
    _raises(ValueError, "cu_seqlens_q packs documents into one sequence: q must have batch size 1, got 2", at,
            q.expand(2, -1, -1, -1), kv.expand(2, -1, -1, -1), kv.expand(2, -1, -1, -1), cu_seqlens_q=cq,
            cu_seqlens_k=ck, **kw)
    _raises(TypeError, "cu_seqlens_q must be a torch.Tensor or None, got list", at, q, kv, kv,
            cu_seqlens_q=[0, 2, 6], cu_seqlens_k=ck, **kw)
