"""Benchmark cases, providers and measurement, shared by `lmfast bench` and benchmarks/.

Every case runs each provider forward ("fwd") and backward ("bwd": the gradient of all inputs,
given the forward's graph) and reports achieved bandwidth, counting each tensor the op must
read or write once (fwd: x and y; bwd: dy, the saved tensor and dx), and its fraction of the
same-run `x.clone()` bandwidth: the practical ceiling of a memory-bound op.

Providers: lmfast-<backend> (the kernels this device runs), eager (what models run in plain
PyTorch), compile (torch.compile of eager), and for rms_norm also torch.rms_norm (PyTorch's
fused op).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import lmfast

OPS = ("layer_norm", "rms_norm", "softmax")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    op: str                   # one of OPS
    shape: tuple[int, ...]    # x's shape; norms and softmax work over the last dim
    dtype: torch.dtype
    causal: bool = False      # softmax only: scale = D^-0.5 and a causal mask, as in attention

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        extra = " scale+causal" if self.causal else ""
        return f"{self.op} {dims} {str(self.dtype).removeprefix('torch.')}{extra}"

    @property
    def nbytes(self) -> int:
        """Bytes of one (shape, dtype) tensor."""
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.finfo(self.dtype).bits // 8


def cases(size: str = "quick", device: str = "cpu", dtype: torch.dtype | None = None,
          ops: Iterable[str] = OPS) -> list[Case]:
    """quick: minutes on a 2-core CPU; full: GPU sizes. (2, 12, 512, 512) is BERT-base
    attention scores; (1024, 4096) is 16 MiB in float32; (4096, 4096) float32 is 64 MiB, past
    the size where a new CPU tensor gets fresh (zeroed) pages from the OS on every allocation,
    so there every op returning a tensor, clone included, is bound by page zeroing."""
    if size == "quick":
        dt = dtype or torch.float32
        rows = [(1024, 4096), (4096, 4096)] if device == "cpu" else [(4096, 4096)]
        scores = (2, 12, 512, 512)
    elif size == "full":
        dt = dtype or (torch.bfloat16 if device != "cpu" else torch.float32)
        rows = [(16384, 4096), (65536, 1024), (4096, 16384)]
        scores = (8, 16, 2048, 2048)
    else:
        raise ValueError(f"size must be 'quick' or 'full', got {size!r}")
    out = []
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
        out += [Case(op, shape, dt) for shape in rows]
        if op == "softmax":
            out.append(Case(op, scores, dt, causal=True))
    return out


# ---- providers: each builds (forward, backward) closures over fresh inputs ---------------

@dataclass
class Bound:
    """A provider bound to one case's inputs."""
    forward: Callable[[], object]
    backward: Callable[[], object] | None  # None: no backward (the copy ceiling)


def _inputs(case: Case, device: str, grad: bool) -> dict[str, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype)
    n = case.shape[-1]
    ins = {"x": x.requires_grad_(grad)}
    if case.op != "softmax":
        ins["weight"] = torch.randn(n, generator=g).to(device=device, dtype=case.dtype).requires_grad_(grad)
    if case.op == "layer_norm":
        ins["bias"] = torch.randn(n, generator=g).to(device=device, dtype=case.dtype).requires_grad_(grad)
    return ins


def _scale(case: Case) -> float:
    return case.shape[-1] ** -0.5 if case.causal else 1.0


def _eager_fn(case: Case, device: str) -> Callable[..., Tensor]:
    if case.op == "layer_norm":
        return lambda x, weight, bias: F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)
    if case.op == "rms_norm":  # Hugging Face LlamaRMSNorm.forward
        def hf_rms_norm(x, weight):
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return weight * h.to(x.dtype)
        return hf_rms_norm
    if not case.causal:
        return lambda x: torch.softmax(x, -1)
    m, n = case.shape[-2:]
    additive = torch.zeros(m, n, device=device, dtype=case.dtype).masked_fill(
        ~lmfast.reference.causal_keep(m, n, device), float("-inf"))
    scale = _scale(case)
    return lambda x: torch.softmax(x * scale + additive, -1)  # eager attention's scores


def _lmfast_fn(case: Case, backend: str) -> Callable[..., Tensor]:
    if case.op == "layer_norm":
        return lambda x, weight, bias: lmfast.ops.layer_norm(x, weight, bias, 1e-5, backend=backend)
    if case.op == "rms_norm":
        return lambda x, weight: lmfast.ops.rms_norm(x, weight, 1e-6, backend=backend)
    scale = _scale(case)
    return lambda x: lmfast.ops.softmax(x, -1, scale, causal=case.causal, backend=backend)


@functools.cache
def _compiled(case: Case, device: str) -> Callable[..., Tensor]:
    # Backward is timed by re-running it on one graph (retain_graph=True), which compiled
    # backwards with donated buffers refuse; donation saves memory, not time.
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    return torch.compile(_eager_fn(case, device))


def providers(case: Case, device: str) -> dict[str, Callable[[], Bound]]:
    """name -> a zero-argument builder of that provider's bound closures, for `case`.
    Builders take `make_fn`, which returns the provider's function of the case's inputs."""
    def bind(make_fn, grad_too=True):
        def build():
            ins = _inputs(case, device, grad=grad_too)
            fn = make_fn()
            if not grad_too:
                return Bound(lambda: fn(**ins), None)
            y = fn(**ins)
            dy = torch.randn_like(y)
            leaves = list(ins.values())
            return Bound(lambda: fn(**ins),
                         lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True))
        return build

    table = {}
    ours = "cpu" if device == "cpu" else "triton"  # (the Triton interpreter is never timed)
    if lmfast.backends()[ours].available:
        table[f"lmfast-{ours}"] = bind(lambda: _lmfast_fn(case, ours))
    table["eager"] = bind(lambda: _eager_fn(case, device))
    if case.op == "rms_norm" and hasattr(F, "rms_norm"):
        table["torch.rms_norm"] = bind(lambda: lambda x, weight: F.rms_norm(x, (x.shape[-1],), weight, 1e-6))
    table["compile"] = bind(lambda: _compiled(case, device))
    table["copy"] = bind(lambda: lambda **ins: ins["x"].clone(), grad_too=False)
    return table


def bytes_moved(case: Case, direction: str) -> int:
    """fwd reads x and writes y; bwd reads dy and the saved x (or y) and writes dx."""
    return case.nbytes * (2 if direction == "fwd" else 3)


def seconds(fn: Callable[[], object], device: str, min_run_time: float) -> float:
    """Median time of one call (torch.utils.benchmark synchronizes CUDA)."""
    from torch.utils.benchmark import Timer

    fn()  # warm up (compiles, autotunes)
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


@dataclass
class Result:
    case: str
    op: str
    shape: list[int]
    dtype: str
    direction: str       # fwd | bwd
    provider: str
    seconds: float
    gbps: float          # achieved bandwidth, GB/s
    frac_of_copy: float  # gbps / same-run clone bandwidth
    vs_eager: float | None = None    # eager's time / this time (> 1: faster than eager)
    vs_compile: float | None = None


def run(selected: list[Case], device: str, *, min_run_time: float = 0.2, rounds: int = 3,
        progress: Callable[[str], None] | None = None) -> list[Result]:
    """Times every provider of every case, forward and backward. Providers (and the copy
    ceiling) are timed in `rounds` interleaved rounds and each keeps its best median, so a
    slow spell of a shared machine does not land on one provider only."""
    results: list[Result] = []
    for case in selected:
        if progress:
            progress(f"{case.name}: preparing (torch.compile takes a while)")
        bound = {name: build() for name, build in providers(case, device).items()}
        timed = {(name, d): (b.forward if d == "fwd" else b.backward)
                 for name, b in bound.items() for d in ("fwd", "bwd")
                 if (b.forward if d == "fwd" else b.backward) is not None}
        best = {key: float("inf") for key in timed}
        for r in range(rounds):
            if progress:
                progress(f"{case.name}: round {r + 1}/{rounds}")
            for key, fn in timed.items():
                best[key] = min(best[key], seconds(fn, device, min_run_time))
        del bound, timed
        copy_gbps = bytes_moved(case, "fwd") / best[("copy", "fwd")] / 1e9
        for direction in ("fwd", "bwd"):
            row = {name: t for (name, d), t in best.items() if d == direction}
            for name, t in row.items():
                gbps = bytes_moved(case, direction) / t / 1e9
                results.append(Result(
                    case.name, case.op, list(case.shape), str(case.dtype).removeprefix("torch."),
                    direction, name, t, gbps, gbps / copy_gbps,
                    row["eager"] / t if name != "copy" else None,
                    row["compile"] / t if name != "copy" else None))
    return results


def environment(device: str) -> dict[str, str]:
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "lmfast": lmfast.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": device, "threads": str(torch.get_num_threads())}
    if device == "cpu":
        env["device_name"] = _cpu_name()
    else:
        env["device_name"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def as_dicts(results: list[Result]) -> list[dict]:
    return [dataclasses.asdict(r) for r in results]


def format_table(results: list[Result]) -> str:
    lines = [f"{'case':38s} {'dir':3s} {'provider':15s} {'time':>10s} {'GB/s':>7s} {'of copy':>7s} {'vs eager':>8s} {'vs compile':>10s}"]
    last = None
    for r in results:
        key = (r.case, r.direction)
        if last is not None and key != last:
            lines.append("")
        last = key
        t = f"{r.seconds * 1e3:8.3f}ms"
        ve = f"{r.vs_eager:7.2f}x" if r.vs_eager else ""
        vc = f"{r.vs_compile:9.2f}x" if r.vs_compile else ""
        lines.append(f"{r.case:38s} {r.direction:3s} {r.provider:15s} {t:>10s} {r.gbps:7.1f} {r.frac_of_copy:6.0%} {ve:>8s} {vc:>10s}")
    return "\n".join(lines)


@functools.cache
def _copy_gbps(case: Case, device: str) -> float:
    """Same-run clone bandwidth for case's tensor size, measured once per pytest session."""
    return bytes_moved(case, "fwd") / seconds(providers(case, device)["copy"]().forward, device, 0.3) / 1e9


def pytest_benchmark(benchmark, case: Case, direction: str, provider: str, device: str) -> None:
    """Body of the benchmarks/ tests: times one (case, direction, provider) with
    pytest-benchmark, grouped per case and direction so providers sit side by side."""
    bound = providers(case, device)[provider]()
    fn = bound.forward if direction == "fwd" else bound.backward
    fn()  # warm up: compile, autotune
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    benchmark.group = f"{case.name} {direction}"
    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)
    gbps = bytes_moved(case, direction) / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update({"GB/s": round(gbps, 2), "frac_of_copy": round(gbps / _copy_gbps(case, device), 3),
                                 "device": device})


def markdown_summary(report: dict) -> str:
    """A README table from a `lmfast bench` JSON report: per case, lmfast's forward bandwidth
    and fraction of copy, and its speedups over eager and torch.compile, forward and backward."""
    env = report["environment"]
    rows = {}
    for r in report["results"]:
        rows.setdefault(r["case"], {})[(r["provider"], r["direction"])] = r
    lines = [f"{env['device_name']}, torch {env['torch']}, {env['date'][:10]} (`lmfast bench --size {report['size']}`)",
             "",
             "| case | lmfast fwd GB/s | of copy | fwd vs eager | fwd vs compile | bwd vs eager | bwd vs compile |",
             "|---|---|---|---|---|---|---|"]
    for case, cells in rows.items():
        ours = next((p for p, d in cells if p.startswith("lmfast-") and d == "fwd"), None)
        if ours is None:
            continue
        f, b = cells[(ours, "fwd")], cells.get((ours, "bwd"))
        bwd = f"{b['vs_eager']:.2f}x | {b['vs_compile']:.2f}x" if b else "- | -"
        lines.append(f"| {case} | {f['gbps']:.1f} | {f['frac_of_copy']:.0%} | {f['vs_eager']:.2f}x | "
                     f"{f['vs_compile']:.2f}x | {bwd} |")
    return "\n".join(lines)
