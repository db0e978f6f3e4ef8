"""One table of bad inputs to every public entry point (ops, modules, patch, the CLI): each
raises ValueError, TypeError or RuntimeError whose message names the argument and what was
expected, before any kernel runs. (test_validation.py checks that the Python and C++ layers
word the same cases the same way on every backend.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lmfast

ops, nn = lmfast.ops, lmfast.nn
x = torch.randn(4, 8)
q, kv = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 7, 16)
meta = torch.device("meta")


def _mha():
    return nn.MultiheadAttention(16, 4, batch_first=True)


# (id, call, exception, regex the message must match)
CASES = [
    # ---- layer_norm / rms_norm -----------------------------------------------------------
    ("ln x not a tensor", lambda: ops.layer_norm([[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("ln x integer", lambda: ops.layer_norm(torch.ones(2, 3, dtype=torch.long)), TypeError, "x must be a float16, bfloat16, float32 or float64 tensor, got torch.int64"),
    ("ln x bool", lambda: ops.layer_norm(torch.ones(2, 3, dtype=torch.bool)), TypeError, "x must be a float16.*got torch.bool"),
    ("ln x complex", lambda: ops.layer_norm(torch.ones(2, 3, dtype=torch.complex64)), TypeError, "x must be a float16.*got torch.complex64"),
    ("ln x 0-dim", lambda: ops.layer_norm(torch.tensor(1.0)), ValueError, "x must have at least one dimension"),
    ("ln weight wrong size", lambda: ops.layer_norm(x, torch.ones(7)), ValueError, r"weight must have shape \(8,\)"),
    ("ln weight 2-D", lambda: ops.layer_norm(x, torch.ones(1, 8)), ValueError, r"weight must have shape \(8,\)"),
    ("ln weight dtype", lambda: ops.layer_norm(x, torch.ones(8, dtype=torch.float16)), TypeError, "weight has dtype torch.float16 but x has dtype torch.float32"),
    ("ln weight device", lambda: ops.layer_norm(x, torch.ones(8, device=meta)), ValueError, "weight is on meta but x is on cpu"),
    ("ln weight not a tensor", lambda: ops.layer_norm(x, [1.0] * 8), TypeError, "weight must be a torch.Tensor, got list"),
    ("ln bias wrong size", lambda: ops.layer_norm(x, None, torch.ones(3)), ValueError, r"bias must have shape \(8,\)"),
    ("ln bias dtype", lambda: ops.layer_norm(x, None, torch.ones(8, dtype=torch.bfloat16)), TypeError, "bias has dtype torch.bfloat16"),
    ("ln residual shape", lambda: ops.layer_norm(x, residual=torch.ones(8)), ValueError, r"residual must have x's shape \(4, 8\)"),
    ("ln residual dtype", lambda: ops.layer_norm(x, residual=x.half()), TypeError, "residual has dtype torch.float16"),
    ("ln residual device", lambda: ops.layer_norm(x, residual=torch.ones(4, 8, device=meta)), ValueError, "residual is on meta but x is on cpu"),
    ("ln eps negative", lambda: ops.layer_norm(x, eps=-1e-5), ValueError, "eps must be >= 0.0, got -1e-05"),
    ("ln eps nan", lambda: ops.layer_norm(x, eps=float("nan")), ValueError, "eps must be finite"),
    ("ln eps str", lambda: ops.layer_norm(x, eps="1e-5"), TypeError, "eps must be a real number, got str"),
    ("rms x integer", lambda: ops.rms_norm(torch.ones(2, 3, dtype=torch.int32)), TypeError, "x must be a float16.*got torch.int32"),
    ("rms weight wrong size", lambda: ops.rms_norm(x, torch.ones(9)), ValueError, r"weight must have shape \(8,\)"),
    ("rms weight dtype", lambda: ops.rms_norm(x, torch.ones(8, dtype=torch.float64)), TypeError, "weight has dtype torch.float64 but x has dtype torch.float32"),
    ("rms residual shape", lambda: ops.rms_norm(x, residual=torch.ones(2, 8)), ValueError, r"residual must have x's shape \(4, 8\)"),
    ("rms eps inf", lambda: ops.rms_norm(x, eps=float("inf")), ValueError, "eps must be finite"),
    ("rms weight_offset inf", lambda: ops.rms_norm(x, torch.ones(8), weight_offset=float("inf")), ValueError, "weight_offset must be finite"),
    ("rms weight_offset without a weight", lambda: ops.rms_norm(x, weight_offset=1.0), ValueError, "weight_offset=1(\\.0)? needs a weight"),
    # ---- softmax ---------------------------------------------------------------------------
    ("sm x integer", lambda: ops.softmax(torch.ones(3, dtype=torch.int32)), TypeError, "x must be a float16"),
    ("sm x not a tensor", lambda: ops.softmax([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    ("sm dim out of range", lambda: ops.softmax(x, 2), ValueError, "dim=2 is out of range for x with 2 dims"),
    ("sm dim float", lambda: ops.softmax(x, 1.0), TypeError, "dim must be an int"),
    ("sm mask shape", lambda: ops.softmax(x, mask=torch.ones(3)), ValueError, r"mask of shape \(3,\) does not broadcast to x's shape \(4, 8\)"),
    ("sm mask more dims", lambda: ops.softmax(x, mask=torch.ones(2, 4, 8)), ValueError, r"mask of shape \(2, 4, 8\) does not broadcast"),
    ("sm mask integer", lambda: ops.softmax(x, mask=torch.ones(8, dtype=torch.long)), TypeError, "mask must be boolean .* or additive float, got torch.int64"),
    ("sm mask dtype", lambda: ops.softmax(x, mask=torch.ones(8, dtype=torch.float16)), TypeError, "additive mask has dtype torch.float16 but x has torch.float32"),
    ("sm mask device", lambda: ops.softmax(x, mask=torch.ones(8, device=meta)), ValueError, "mask is on meta but x is on cpu"),
    ("sm scale inf", lambda: ops.softmax(x, scale=float("inf")), ValueError, "scale must be finite"),
    ("sm scale None", lambda: ops.softmax(x, scale=None), TypeError, "scale must be a real number"),
    ("sm causal other dim", lambda: ops.softmax(x, 0, causal=True), ValueError, "causal=True .* needs dim=-1"),
    ("sm causal 1-D", lambda: ops.softmax(torch.randn(5), causal=True), ValueError, "needs dim=-1 and x with >= 2 dims"),
    ("sm causal int", lambda: ops.softmax(x, causal=1), TypeError, "causal must be a bool"),
    # ---- attention -------------------------------------------------------------------------
    ("attn q 3-D", lambda: ops.attention(q[0], kv, kv), ValueError, r"q must have 4 dims \(B, H, S, D\)"),
    ("attn k 5-D", lambda: ops.attention(q, kv[None], kv), ValueError, r"k must have 4 dims"),
    ("attn q integer", lambda: ops.attention(q.long(), kv, kv), TypeError, "q must be a float16.*got torch.int64"),
    ("attn v not a tensor", lambda: ops.attention(q, kv, "v"), TypeError, "v must be a torch.Tensor"),
    ("attn k dtype", lambda: ops.attention(q, kv.half(), kv), TypeError, "k has dtype torch.float16 but q has dtype torch.float32"),
    ("attn v device", lambda: ops.attention(q, kv, kv.to(meta)), ValueError, "v is on meta but q is on cpu"),
    ("attn k v shapes", lambda: ops.attention(q, kv, kv[:, :, :6]), ValueError, r"k and v must have the same \(B, Hkv, Sk\)"),
    ("attn batch", lambda: ops.attention(q, torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)), ValueError, "k and v have batch size 2 but q has 1"),
    ("attn head dim", lambda: ops.attention(q, torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)), ValueError, "k has head dim 8 but q has 16"),
    ("attn heads not a multiple", lambda: ops.attention(q, torch.randn(1, 3, 7, 16), torch.randn(1, 3, 7, 16)), ValueError, "q's 4 heads must be a multiple of k's and v's 3 heads"),
    ("attn mask shape", lambda: ops.attention(q, kv, kv, torch.ones(5, 6, dtype=torch.bool)), ValueError, r"attn_mask of shape \(5, 6\) does not broadcast"),
    ("attn mask integer", lambda: ops.attention(q, kv, kv, torch.ones(5, 7, dtype=torch.int32)), TypeError, "attn_mask must be boolean"),
    ("attn mask dtype", lambda: ops.attention(q, kv, kv, torch.ones(5, 7, dtype=torch.float16)), TypeError, "additive attn_mask has dtype torch.float16"),
    ("attn window 0", lambda: ops.attention(q, kv, kv, window=0), ValueError, r"window must be >= 1"),
    ("attn window float", lambda: ops.attention(q, kv, kv, window=2.5), TypeError, "window must be an int or None"),
    ("attn causal str", lambda: ops.attention(q, kv, kv, causal="yes"), TypeError, "causal must be a bool"),
    ("attn scale nan", lambda: ops.attention(q, kv, kv, scale=float("nan")), ValueError, "scale must be finite"),
    ("attn dropout 1", lambda: ops.attention(q, kv, kv, dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1"),
    ("attn dropout negative", lambda: ops.attention(q, kv, kv, dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("attn sinks shape", lambda: ops.attention(q, kv, kv, sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(Hq,\) = \(4,\)"),
    ("attn sinks not a tensor", lambda: ops.attention(q, kv, kv, sinks=[0.0] * 4), TypeError, "sinks must be a torch.Tensor or None"),
    ("attn sinks integer", lambda: ops.attention(q, kv, kv, sinks=torch.zeros(4, dtype=torch.long)), TypeError, "sinks must be a floating tensor"),
    ("attn sinks device", lambda: ops.attention(q, kv, kv, sinks=torch.zeros(4, device=meta)), ValueError, "sinks is on meta but q is on cpu"),
    ("attn softcap 0", lambda: ops.attention(q, kv, kv, softcap=0.0), ValueError, r"softcap must be positive .*got 0"),
    ("attn softcap negative", lambda: ops.attention(q, kv, kv, softcap=-50), ValueError, r"softcap must be positive .*got -50"),
    ("attn softcap inf", lambda: ops.attention(q, kv, kv, softcap=float("inf")), ValueError, "softcap must be finite"),
    ("attn softcap str", lambda: ops.attention(q, kv, kv, softcap="50"), TypeError, "softcap must be a real number"),
    ("attn dropout str", lambda: ops.attention(q, kv, kv, dropout_p="0.1"), TypeError, "dropout_p must be a real number"),
    ("attn dropout seed float", lambda: ops.attention(q, kv, kv, dropout_p=0.1, dropout_seed=torch.zeros(1)), TypeError, "dropout_seed must be an int64 tensor"),
    ("attn dropout seed shape", lambda: ops.attention(q, kv, kv, dropout_p=0.1, dropout_seed=torch.zeros(2, dtype=torch.long)), ValueError, "dropout_seed must .*one element"),
    ("attn dropout seed int", lambda: ops.attention(q, kv, kv, dropout_p=0.1, dropout_seed=3), TypeError, "dropout_seed must be a torch.Tensor or None"),
    # ---- backends --------------------------------------------------------------------------
    ("backend unknown", lambda: ops.softmax(x, backend="gpu"), ValueError, "backend must be one of"),
    ("backend not a str", lambda: ops.layer_norm(x, backend=["cpu"]), TypeError, "backend must be a str"),
    ("backend cpu on meta", lambda: ops.softmax(torch.randn(2, 3, device=meta), backend="cpu"), ValueError, "backend 'cpu' runs on CPU tensors, got a tensor on meta"),
    ("backend cuda here", lambda: ops.rms_norm(x, backend="cuda"), RuntimeError, "backend 'cuda' is not available"),
    ("backend cuda attention here", lambda: ops.attention(q, kv, kv, backend="cuda"), RuntimeError, "backend 'cuda' is not available"),
    ("backend triton float64", lambda: ops.softmax(x.double(), backend="triton"), TypeError, "backend 'triton' supports float16, bfloat16 and float32, got torch.float64"),
    # ---- modules -----------------------------------------------------------------------------
    ("LayerNorm wrong width", lambda: nn.LayerNorm(8)(torch.randn(2, 7)), ValueError, r"\(8,\)"),
    ("LayerNorm integer input", lambda: nn.LayerNorm(8)(torch.ones(2, 8, dtype=torch.long)), TypeError, "x must be a float16"),
    ("RMSNorm float32-casting integer input", lambda: nn.RMSNorm(8, casting="float32")(torch.ones(2, 8, dtype=torch.long)), TypeError, "x must be a float16"),
    ("Gemma RMSNorm integer input", lambda: nn.RMSNorm(8, weight_offset=1.0)(torch.ones(2, 8, dtype=torch.int32)), TypeError, "x must be a float16"),
    # (mixed dtypes, x bfloat16 with float32 parameters: the residual is still checked against x)
    ("Gemma RMSNorm mixed residual dtype", lambda: nn.RMSNorm(8, weight_offset=1.0)(x.bfloat16(), x), TypeError, "residual has dtype torch.float32"),
    ("LayerNorm mixed residual dtype", lambda: nn.LayerNorm(8)(x.bfloat16(), x), TypeError, "residual has dtype torch.float32"),
    ("LayerNorm mixed residual shape", lambda: nn.LayerNorm(8)(x.bfloat16(), x[:2].bfloat16()), ValueError, "residual must have x's shape"),
    ("RMSNorm wrong width", lambda: nn.RMSNorm(8)(torch.randn(2, 7)), ValueError, r"weight must have shape \(7,\)|\(8,\)"),
    ("HFLayerNorm x not a tensor", lambda: nn.HFLayerNorm(8)([[1.0] * 8]), TypeError, "x must be a torch.Tensor, got list"),
    ("HFLayerNorm integer input", lambda: nn.HFLayerNorm(8)(torch.ones(2, 8, dtype=torch.long)), TypeError, "x must be a float16"),
    ("HFLayerNorm wrong width", lambda: nn.HFLayerNorm(8)(torch.randn(2, 7)), ValueError, r"weight must have shape \(7,\)"),
    ("HFLayerNorm mixed residual dtype", lambda: nn.HFLayerNorm(8)(x.bfloat16(), x), TypeError, "residual has dtype torch.float32"),
    ("RMSNorm backend unknown", lambda: nn.RMSNorm(8, backend="tpu")(torch.randn(2, 8)), ValueError, "backend must be one of"),
    ("Attention 3-D q", lambda: nn.Attention()(q[0], kv, kv), ValueError, r"q must have 4 dims"),
    ("Softmax integer input", lambda: nn.Softmax(dim=-1)(torch.ones(3, dtype=torch.long)), TypeError, "x must be a float16"),
    # (the drop-in keeps torch.nn.MultiheadAttention's own exception type for this check)
    ("MultiheadAttention wrong embed dim", lambda: _mha()(torch.randn(2, 5, 12), torch.randn(2, 5, 12), torch.randn(2, 5, 12)), AssertionError, "was expecting embedding dimension of 16, but got 12"),
    # ---- patch -----------------------------------------------------------------------------
    ("patch not a module", lambda: lmfast.patch("model"), TypeError, "model must be a torch.nn.Module, got str"),
    ("patch backend unknown", lambda: lmfast.patch(torch.nn.LayerNorm(8), backend="gpu"), ValueError, "backend must be one of"),
    ("patch backend not a str", lambda: lmfast.patch(torch.nn.LayerNorm(8), backend=None), TypeError, "backend must be a str"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_the_table_covers_every_public_entry_point():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES), "duplicate ids"


CLI_CASES = [
    (["bench", "--ops", "matmul"], "invalid choice: 'matmul'"),
    (["bench", "--rounds", "0"], "--rounds must be at least 1"),
    (["bench", "--size", "huge"], "invalid choice: 'huge'"),
    (["bench", "--compare", "/nonexistent/report.json"], "--compare: cannot read /nonexistent/report.json"),
    (["generate", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("args,message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_rejects_bad_arguments_with_a_message(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmfast.cli", *args], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
