"""Reliability of the kernels in long runs: bit-identical results across repeated calls
(forward, and backward on the CPU) and, on the CPU, across thread counts; the same results from
8 Python threads at once as from serial calls, no growth in process memory over 10,000 calls
of each op, and attention memory that grows linearly with the sequence length.

GPU backends: the Triton and CUDA C++ kernels use no atomics (weight gradients are summed from
per-program partials in a fixed order), so their results repeat bit for bit on one GPU and
launch configuration; this file's repeatability tests run on them where a GPU is present.
Triton attention's autotuned tiles are pinned by torch.use_deterministic_algorithms(True)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import sys
import threading

import pytest
import torch

import lmfast


def _calls(device: str, dtype: torch.dtype, backend: str, seed: int = 0):
    """One call of each op on fixed inputs (with grad): name -> () -> (outputs, gradients)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    x, r, w, b = rand(37, 300), rand(37, 300), rand(300), rand(300)
    s, m = rand(2, 3, 17, 65), rand(1, 3, 17, 65)
    q, k, v = rand(2, 4, 33, 64), rand(2, 2, 47, 64), rand(2, 2, 47, 64)
    ops = {
        "layer_norm": (lambda: lmfast.ops.layer_norm(x, w, b, residual=r, backend=backend), (x, r, w, b)),
        "rms_norm": (lambda: lmfast.ops.rms_norm(x, w, residual=r, backend=backend), (x, r, w)),
        "softmax": (lambda: lmfast.ops.softmax(s, scale=0.3, mask=m, causal=True, backend=backend), (s, m)),
        "attention": (lambda: lmfast.ops.attention(q, k, v, causal=True, return_lse=True, backend=backend),
                      (q, k, v)),
    }

    def run(fn, leaves):
        def call():
            out = fn()
            outs = out if isinstance(out, tuple) else (out,)
            gen = torch.Generator().manual_seed(1)
            dys = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
            grads = torch.autograd.grad(outs, leaves, dys)
            return [o.detach() for o in outs], list(grads)
        return call
    return {name: run(fn, leaves) for name, (fn, leaves) in ops.items()}


def _bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8) if x.numel() else x, y.view(torch.uint8) if y.numel() else y)
               for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_results_repeat_bit_for_bit(kb, dtype):
    for name, call in _calls(kb.device, dtype, kb.name).items():
        first_out, first_grads = call()
        for _ in range(3):
            out, grads = call()
            assert _bitwise_equal(out, first_out), f"{name} {kb.name}: the forward differs between calls"
            assert _bitwise_equal(grads, first_grads), f"{name} {kb.name}: the backward differs between calls"


def test_eight_python_threads_match_serial_calls():
    """Each of 8 threads runs every op 10 times on its own inputs (torch's intra-op threads
    underneath); every result must equal the serial result bit for bit."""
    calls = [_calls("cpu", torch.float32, "cpu", seed=t) for t in range(8)]
    serial = [{name: call() for name, call in c.items()} for c in calls]
    errors: list[str] = []

    def worker(t: int):
        try:
            for _ in range(10):
                for name, call in calls[t].items():
                    out, grads = call()
                    if not (_bitwise_equal(out, serial[t][name][0]) and _bitwise_equal(grads, serial[t][name][1])):
                        errors.append(f"thread {t}: {name} differs from its serial result")
        except Exception as e:  # surfaced below: an exception in a thread would be lost
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:5]


def _thread_count_cases():
    """Shapes that exercise every way the CPU kernels split their work: a norm backward over many
    row blocks, attention with long queries (128- and 256-row query blocks), short queries with
    their keys split (decoding, GQA) and a bfloat16 prefill, with and without dropout."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype).requires_grad_()

    x, r, w, b = rand(3001, 257), rand(3001, 257), rand(257), rand(257)
    xb, wb = rand(700, 1024, dtype=torch.bfloat16), rand(1024, dtype=torch.bfloat16)
    s = rand(3, 5, 130, 333)
    q1, k1, v1 = rand(1, 4, 700, 64), rand(1, 4, 700, 64), rand(1, 4, 700, 64)       # 128-row blocks
    q2, k2, v2 = rand(4, 8, 520, 64), rand(4, 2, 520, 64), rand(4, 2, 520, 64)       # 256-row blocks, GQA
    qd, kd, vd = rand(2, 9, 1, 64), rand(2, 3, 3000, 64), rand(2, 3, 3000, 64)       # decoding: keys split
    qb, kb_, vb = (rand(2, 6, 300, 64, dtype=torch.bfloat16) for _ in range(3))
    return {
        "layer_norm": (lambda: lmfast.ops.layer_norm(x, w, b, residual=r, backend="cpu"), (x, r, w, b)),
        "rms_norm bf16": (lambda: lmfast.ops.rms_norm(xb, wb, backend="cpu"), (xb, wb)),
        "softmax": (lambda: lmfast.ops.softmax(s, scale=0.5, causal=True, backend="cpu"), (s,)),
        "attention 128-row blocks": (lambda: lmfast.ops.attention(q1, k1, v1, causal=True, backend="cpu"),
                                     (q1, k1, v1)),
        "attention 256-row blocks": (lambda: lmfast.ops.attention(q2, k2, v2, backend="cpu"), (q2, k2, v2)),
        "attention decode": (lambda: lmfast.ops.attention(qd, kd, vd, backend="cpu"), (qd, kd, vd)),
        "attention bf16": (lambda: lmfast.ops.attention(qb, kb_, vb, causal=True, backend="cpu"), (qb, kb_, vb)),
        "attention bf16 dropout": (lambda: lmfast.ops.attention(qb, kb_, vb, causal=True, dropout_p=0.3, backend="cpu",
                                                                dropout_seed=torch.tensor([9])), (qb, kb_, vb)),
        "attention decode dropout": (lambda: lmfast.ops.attention(qd, kd, vd, dropout_p=0.3, backend="cpu",
                                                                  dropout_seed=torch.tensor([9])), (qd, kd, vd)),
    }


def test_cpu_results_do_not_depend_on_the_thread_count():
    """The CPU kernels split their work by the shape alone, so torch.set_num_threads(1, 2, 3, 8)
    gives the same bits, forward and backward: a job resumed with another thread count, or a
    run reproduced on a machine with more cores of the same CPU, computes the same numbers.
    (Found: the norms' dweight / dbias were summed in one block per thread, and attention sized
    its query blocks and decoding key splits from the thread count.)"""
    cases = _thread_count_cases()
    saved = torch.get_num_threads()
    results: dict[int, dict[str, tuple]] = {}
    try:
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            results[threads] = {}
            for name, (fn, leaves) in cases.items():
                outs = fn()
                outs = outs if isinstance(outs, tuple) else (outs,)
                gen = torch.Generator().manual_seed(1)
                dys = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
                results[threads][name] = ([o.detach() for o in outs], list(torch.autograd.grad(outs, leaves, dys)))
    finally:
        torch.set_num_threads(saved)
    for threads in (2, 3, 8):
        for name, (out, grads) in results[threads].items():
            out1, grads1 = results[1][name]
            assert _bitwise_equal(out, out1), f"{name}: the forward with {threads} threads differs from 1 thread"
            assert _bitwise_equal(grads, grads1), f"{name}: the backward with {threads} threads differs from 1 thread"


def _run_child(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=tempfile.gettempdir(),  # (not the checkout's lmfast, which `python -c` would import)
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


RSS = ("def rss_kib():\n"
       "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))\n")


def test_ten_thousand_calls_leave_no_memory_growth():
    code = RSS + (
        "import os, sys\n"
        "sys.path = [p for p in sys.path if p not in ('', os.getcwd())]  # the installed lmfast\n"
        "import torch, lmfast\n"
        "x, w, b = torch.randn(4, 256), torch.randn(256), torch.randn(256)\n"
        "s, q, k = torch.randn(2, 2, 8, 32), torch.randn(1, 4, 3, 32), torch.randn(1, 2, 40, 32)\n"
        "xg = x.clone().requires_grad_()\n"
        "calls = [lambda: lmfast.ops.layer_norm(x, w, b), lambda: lmfast.ops.rms_norm(x, w),\n"
        "         lambda: lmfast.ops.softmax(s, causal=True), lambda: lmfast.ops.attention(q, k, k, causal=True),\n"
        "         lambda: lmfast.ops.rms_norm(xg, w).sum().backward()]\n"
        "for f in calls:\n"
        "    for _ in range(2000): f()\n"
        "before = rss_kib()\n"
        "for f in calls:\n"
        "    for _ in range(10000): f()\n"
        "print(rss_kib() - before)\n")
    grew_kib = int(_run_child(code))
    # 50,000 calls: a leak of even 100 bytes a call would be 5 MB
    assert grew_kib < 2048, f"process memory grew by {grew_kib} KiB over 10,000 calls of each op"


def test_attention_memory_grows_linearly_with_sequence_length():
    """Peak memory of a causal CPU forward at S = 2k, 4k, 8k (one head, D = 64, float32): within
    a bound from the tensors' own sizes (q, k, v, o: 4 S D floats) plus fixed per-thread tiles,
    where a (S, S) score matrix would be S^2 floats (256 MiB at 8k)."""
    code = RSS.replace("VmRSS", "VmHWM") + (
        "import os, sys\n"
        "sys.path = [p for p in sys.path if p not in ('', os.getcwd())]\n"
        "import torch, lmfast\n"
        "lmfast.ops.attention(*(torch.randn(1, 1, 64, 64) for _ in range(3)), backend='cpu')  # load, warm up\n"
        "for S in (2048, 4096, 8192):\n"
        "    q, k, v = (torch.randn(1, 1, S, 64) for _ in range(3))\n"
        "    before = rss_kib()\n"
        "    o = lmfast.ops.attention(q, k, v, causal=True, backend='cpu')\n"
        "    print(S, rss_kib() - before)\n"
        "    del q, k, v, o\n")
    for line in _run_child(code).splitlines():
        S, grew_kib = map(int, line.split())
        tensors_kib = 4 * S * 64 * 4 // 1024
        bound_kib = 2 * tensors_kib + 8 * 1024  # twice the tensors, 8 MiB of tiles and workspace
        assert grew_kib <= bound_kib, f"S={S}: peak grew {grew_kib} KiB, bound {bound_kib} KiB (S^2 scores: " \
                                      f"{S * S * 4 // 1024} KiB)"


@pytest.mark.parametrize("S,causal", [(8192, False), (16384, True)])
def test_attention_backward_memory_is_bounded(S, causal):
    """Peak memory of a CPU backward of one head (D = 64, float32, 2 threads), in a fresh
    process: dq, dk, dv, the per-thread rows of p and dp (4 MiB each), K^T and V^T per thread
    (the float tile products' operands, S keys each at these S), the dk, dv partials of the
    chunks a lone head is split into (32 MiB at most), and 40 MiB of workspace the first large
    backward of a process allocates (43-59 MiB grew in all, before the split). With 128 MiB of
    partials allowed, S = 8k non-causal grew 175 MiB; now 77."""
    code = RSS.replace("VmRSS", "VmHWM") + (
        "import os, sys\n"
        "sys.path = [p for p in sys.path if p not in ('', os.getcwd())]\n"
        "import torch, lmfast\n"
        "torch.set_num_threads(2)\n"
        "x = torch.randn(1, 1, 300, 64, requires_grad=True)\n"
        "lmfast.ops.attention(x, x, x, causal=True, backend='cpu').sum().backward()  # load, warm up\n"
        f"q, k, v = (torch.randn(1, 1, {S}, 64, requires_grad=True) for _ in range(3))\n"
        f"o = lmfast.ops.attention(q, k, v, causal={causal}, backend='cpu')\n"
        "do = torch.randn_like(o)\n"
        "before = rss_kib()\n"
        "grads = torch.autograd.grad(o, (q, k, v), do)\n"
        "print(rss_kib() - before)\n")
    grew_kib = int(_run_child(code))
    grads_kib = 3 * S * 64 * 4 // 1024
    kv_transposed_kib = 2 * 2 * S * 64 * 4 // 1024  # 2 threads x (K^T, V^T)
    bound_kib = grads_kib + 2 * 2 * 4 * 1024 + kv_transposed_kib + 32 * 1024 + 40 * 1024  # + rows, partials, workspace
    assert grew_kib <= bound_kib, f"S={S} causal={causal}: peak grew {grew_kib} KiB, bound {bound_kib} KiB"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_new_sequence_lengths_leave_no_memory_growth(dtype):
    """The CPU attention's tiles multiply on oneDNN's brgemm (float ones where full; bfloat16 ones
    where the CPU multiplies bfloat16 natively), which compiles a kernel for each (shape, leading
    dims) a thread meets and keeps it for the life of the process. Only shapes from a small set
    may go there (full float tiles with leading dims from key_stride; bfloat16 tiles padded to
    multiples of 16 rows and 32 keys, forward and backward): with exact shapes, every new sequence
    length added kernels, 1.5 MiB a length in float32 (445 MiB over 256 lengths) and 0.36-0.78 in
    bfloat16, 2 threads. 60 new lengths in a fresh process, forward and backward."""
    code = RSS + (
        "import os, sys\n"
        "sys.path = [p for p in sys.path if p not in ('', os.getcwd())]\n"
        "import torch, lmfast\n"
        "torch.set_num_threads(2)\n"
        "def step(S):\n"
        f"    q, k, v = (torch.randn(1, 4, S, 64, dtype=torch.{dtype}, requires_grad=True) for _ in range(3))\n"
        "    lmfast.ops.attention(q, k, v, causal=True, backend='cpu').float().sum().backward()\n"
        "for S in range(300, 310): step(S)  # (the kernels of the full tiles, and the allocator's pools)\n"
        "before = rss_kib()\n"
        "for S in range(310, 370): step(S)\n"
        "print(rss_kib() - before)\n")
    grew_kib = int(_run_child(code))
    assert grew_kib <= 16 * 1024, f"{dtype}: 60 new sequence lengths grew RSS by {grew_kib} KiB"


def test_deterministic_algorithms_pin_the_triton_attention_tiles(monkeypatch):
    """On a GPU the Triton attention kernels autotune their tiles by timing, so two processes can
    pick different tiles and round differently. torch.use_deterministic_algorithms(True) (or
    LMFAST_AUTOTUNE=0) launches the fixed first tile of the head-dim bucket instead. The launch
    path is checked here with stand-in kernels (no GPU needed)."""
    from lmfast.kernels import attention as kernels

    class StandIn:  # records the meta-parameters of each `kernel[grid](...)` launch
        def __init__(self):
            self.launches = []

        def __getitem__(self, grid):
            return lambda *args, **meta: self.launches.append(meta)

    plain, tuned = StandIn(), StandIn()
    monkeypatch.setitem(kernels._TUNED, plain, (tuned, {64: [kernels._config(32, 16, 4, 1)]}))
    monkeypatch.setattr(kernels._common, "interpreted", lambda: False)
    monkeypatch.setenv("LMFAST_AUTOTUNE", "1")

    def launch():
        kernels._launch(plain, lambda meta: (1,), (), {"BLOCK_D": 64, "BLOCK_DV": 64}, 8, 8)

    launch()
    assert len(tuned.launches) == 1 and not plain.launches, "autotuning is on by default"
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        launch()
    finally:
        torch.use_deterministic_algorithms(saved)
    assert len(tuned.launches) == 1 and plain.launches[-1]["BLOCK_M"] == 32, \
        "with deterministic algorithms on, the fixed tile must be launched"
    monkeypatch.setenv("LMFAST_AUTOTUNE", "0")
    launch()
    assert len(plain.launches) == 2 and plain.launches[-1]["BLOCK_N"] == 16
