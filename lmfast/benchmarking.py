"""Benchmark cases, providers and measurement, shared by `lmfast bench` and benchmarks/.

Memory-bound ops (layer_norm, rms_norm, softmax) run forward ("fwd") and backward ("bwd": the
gradient of all inputs, given the forward's graph) and report achieved bandwidth (GB/s),
counting each tensor the op must read or write once (fwd: x and y; bwd: dy, the saved tensor
and dx), as a fraction of the same-run `x.clone()` bandwidth: their practical ceiling.

Attention is compute-bound: it runs forward and forward+backward ("fwd+bwd") and reports
TFLOP/s, counting the matmul FLOPs of the visible (query, key) pairs (4 D per pair forward, 2.5x
that backward, the FlashAttention convention), as a fraction of the same-run rate of a large
matmul in the case's dtype: its practical ceiling.

Providers: lmfast-<backend> (the kernels this device runs), eager (what models run in plain
PyTorch), compile (torch.compile of eager), for rms_norm also torch.rms_norm (PyTorch's fused
op), for attention also sdpa-<backend> (F.scaled_dot_product_attention with each backend
this device runs), and the ceiling (copy or matmul).
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

OPS = ("layer_norm", "rms_norm", "softmax", "attention")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    op: str                   # one of OPS
    shape: tuple[int, ...]    # x's shape (norms and softmax work over the last dim); attention:
                              # (B, H, S, D) of q, k and v
    dtype: torch.dtype
    causal: bool = False      # softmax: scale = D^-0.5 and a causal mask, as in attention
    kv_heads: int | None = None  # attention: k and v heads (grouped-query attention), else H
    dropout: float = 0.0      # attention: dropout_p (training), in every provider
    softcap: float = 0.0      # attention: Gemma 2's logit softcap c (scores c tanh(s / c)); SDPA has none
    documents: tuple[int, ...] = ()  # attention: lengths of documents packed in a row (B = 1, summing to S),
    #                                  each attending to itself alone (causal: causally): a boolean mask for
    #                                  the others, their boundaries (cu_seqlens) for lmfast
    v_head_dim: int | None = None  # attention: v's head dim where it differs from q's and k's (DeepSeek's MLA)

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        gqa = f" gqa{self.shape[1] // self.kv_heads}" if self.kv_heads not in (None, self.shape[1]) else ""
        extra = " causal" if self.op == "attention" and self.causal else " scale+causal" if self.causal else ""
        extra += f" dropout{self.dropout:g}" if self.dropout else ""
        extra += f" softcap{self.softcap:g}" if self.softcap else ""
        extra += f" packed{len(self.documents)}" if self.documents else ""
        extra += f" dv{self.v_head_dim}" if self.v_head_dim else ""
        return f"{self.op} {dims}{gqa} {str(self.dtype).removeprefix('torch.')}{extra}"

    @property
    def kv_shape(self) -> tuple[int, ...]:
        """attention: the shape of k and v."""
        B, H, S, D = self.shape
        return (B, self.kv_heads or H, S, D)

    @property
    def v_shape(self) -> tuple[int, ...]:
        """attention: the shape of v."""
        return (*self.kv_shape[:3], self.v_head_dim or self.shape[3])

    @property
    def compute_bound(self) -> bool:
        return self.op == "attention"

    @property
    def directions(self) -> tuple[str, str]:
        return ("fwd", "fwd+bwd") if self.compute_bound else ("fwd", "bwd")

    @property
    def unit(self) -> str:
        return "TFLOP/s" if self.compute_bound else "GB/s"

    @property
    def ceiling(self) -> str:
        """The provider whose rate is this case's practical ceiling."""
        return "matmul" if self.compute_bound else "copy"

    @property
    def nbytes(self) -> int:
        """Bytes of one (shape, dtype) tensor."""
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.finfo(self.dtype).bits // 8

    def work(self, direction: str) -> float:
        """Units of work of one call: bytes moved, or TFLOPs (attention)."""
        if not self.compute_bound:
            return self.nbytes * (2 if direction == "fwd" else 3)
        B, H, S, D = self.shape
        # the (query, key) pairs computed: with packed documents, those the mask keeps
        pairs = sum(n * (n + 1) // 2 if self.causal else n * n for n in self.documents or (S,))
        fwd = 2 * B * H * pairs * (D + (self.v_head_dim or D)) / 1e12  # q k^T, then p v
        return fwd if direction == "fwd" else 3.5 * fwd

    def document_mask(self, device: str) -> Tensor | None:
        """attention with documents: the (1, 1, S, S) boolean mask (True = keep), else None."""
        if not self.documents:
            return None
        doc = torch.repeat_interleave(torch.arange(len(self.documents)), torch.tensor(self.documents))
        keep = doc[:, None] == doc[None, :]
        if self.causal:
            keep &= lmfast.reference.causal_keep(len(doc), len(doc))
        return keep[None, None].to(device)

    def cu_seqlens(self, device: str) -> Tensor | None:
        """attention with documents: their boundaries, int32 (n + 1,), as lmfast takes them; else None."""
        if not self.documents:
            return None
        return torch.tensor([0, *torch.tensor(self.documents).cumsum(0).tolist()], dtype=torch.int32, device=device)


# Ceiling of compute-bound cases: an (n x n) @ (n x n) matmul.
MATMUL_N = {"cpu": 2048, "cuda": 8192}


# Lengths of the documents packed in a row of S tokens (padding-free training), by S.
PACKED_DOCUMENTS = {2048: (300, 700, 512, 536),
                    16384: (1000, 3000, 500, 2500, 4000, 1384, 2000, 2000)}


def cases(size: str = "quick", device: str = "cpu", dtype: torch.dtype | None = None,
          ops: Iterable[str] = OPS) -> list[Case]:
    """quick (the default): about two minutes on a 2-core CPU (lmfast bench adds its model
    row); full: the thorough set of the device (GPU sizes on a GPU). (2, 12, 512, 512) is
    BERT-base attention scores; (1024, 4096) is 16 MiB in float32; (4096, 4096) float32 is
    64 MiB, past the size where a new CPU tensor gets fresh (zeroed) pages from the OS on every
    allocation, so there every op returning a tensor, clone included, is bound by page zeroing.
    Attention: (4, 12, 1024, 64) is BERT-base-like at 4k tokens; the full CPU set adds
    SmolLM2-135M's at batch 1 (9 query heads on 3 kv heads, 2k tokens, causal), where the few
    (batch, kv head) pairs must be split to occupy the cores, and BERT-base training's attention
    dropout (0.1); at GPU full size, 16k tokens (B * S) with head dims 128 (16 heads) and 64 (32
    heads), S from 512 to 16k, and the first of them with dropout. Both full sets end with Gemma
    2 2B's attention (8 query heads on 4 kv heads, head dim 256, causal, logit softcap 50;
    against its eager attention and torch.compile of it: SDPA has no softcap) at 2k tokens (CPU)
    or 16k (GPU), then packed documents (PACKED_DOCUMENTS: a row of 2k tokens holding 4, CPU,
    or of 16k holding 8, GPU; each document causal and alone, a boolean mask that every
    provider takes, lmfast with causal=True beside it; TFLOP/s count the pairs it keeps), then
    DeepSeek V3's multi-head latent attention (q and k heads of 192, v heads of 128; causal;
    16 heads at 1k tokens on a CPU, 8k tokens on a GPU)."""
    if size not in ("quick", "full"):
        raise ValueError(f"size must be 'quick' or 'full', got {size!r}")
    on_cpu = device == "cpu"
    if size == "quick" or on_cpu:
        dt = dtype or torch.float32
        rows = [(1024, 4096)] if on_cpu else [(4096, 4096)]
        if size == "full":
            rows.append((4096, 4096))
        scores = (2, 12, 512, 512)
        attention = [(4, 12, 1024, 64)]
    else:
        dt = dtype or torch.bfloat16
        rows = [(32768, 1024), (32768, 4096), (32768, 16384)]  # issue 13's targets: 32k rows of 1k-16k
        scores = (8, 16, 2048, 2048)
        # the target sizes (D = 128, S >= 2k) first, so that a time-limited run has them
        attention = [(16384 // S, 16, S, 128) for S in (2048, 8192, 16384, 512)] + \
                    [(16384 // S, 32, S, 64) for S in (2048, 16384)]
    # The quick CPU run adds bfloat16 rows for the ops bfloat16 models run most (on a CPU with
    # AMX-BF16 or AVX512-BF16, attention's tile products run in bfloat16 on oneDNN's brgemm).
    extra_bf16 = on_cpu and size == "quick" and dtype is None
    out = []
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
        if op == "attention":
            out += [Case(op, shape, dt, causal) for shape in attention for causal in (False, True)]
            if extra_bf16:
                out += [Case(op, attention[0], torch.bfloat16, causal) for causal in (False, True)]
            if on_cpu and size == "full":
                out += [Case(op, (1, 9, 2048, 64), d, True, kv_heads=3) for d in (dt, torch.bfloat16)]
            if size == "full":
                out += [Case(op, attention[0], d, dropout=0.1) for d in dict.fromkeys((dt, torch.bfloat16))]
                gemma2 = (1, 8, 2048, 256) if on_cpu else (4, 8, 4096, 256)
                out += [Case(op, gemma2, d, True, kv_heads=4, softcap=50.0) for d in dict.fromkeys((dt, torch.bfloat16))]
                packed = (1, 12, 2048, 64) if on_cpu else (1, 16, 16384, 128)
                out += [Case(op, packed, d, True, documents=PACKED_DOCUMENTS[packed[2]])
                        for d in dict.fromkeys((dt, torch.bfloat16))]
                mla = (1, 16, 1024, 192) if on_cpu else (2, 16, 4096, 192)
                out += [Case(op, mla, d, True, v_head_dim=128) for d in dict.fromkeys((dt, torch.bfloat16))]
            continue
        out += [Case(op, shape, dt) for shape in rows]
        if op == "rms_norm" and extra_bf16:
            out.append(Case(op, rows[0], torch.bfloat16))
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
    if case.op == "attention":
        shapes = {"q": case.shape, "k": case.kv_shape, "v": case.v_shape}
        return {n: torch.randn(shapes[n], generator=g).to(device=device, dtype=case.dtype).requires_grad_(grad)
                for n in "qkv"}
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


def _eager_attention(case: Case, device: str) -> Callable[..., Tensor]:
    """Attention as Hugging Face's eager path computes it: matmul, mask, float32 softmax, matmul."""
    S, D = case.shape[2], case.shape[3]
    additive = None
    if case.causal or case.documents:
        keep = case.document_mask(device) if case.documents else lmfast.reference.causal_keep(S, S, device)
        additive = torch.zeros(keep.shape, device=device, dtype=case.dtype).masked_fill(~keep, float("-inf"))

    group = case.shape[1] // case.kv_shape[1]

    def eager_attention(q, k, v):
        if group > 1:  # Hugging Face's repeat_kv
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        if case.softcap:  # as Gemma 2's eager attention caps the scores
            s = torch.tanh(s / case.softcap) * case.softcap
        if additive is not None:
            s = s + additive
        p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
        return F.dropout(p, case.dropout) @ v if case.dropout else p @ v
    return eager_attention


def _sdpa_fn(case: Case, backend, device: str) -> Callable[..., Tensor]:
    gqa = {"enable_gqa": True} if case.kv_shape[1] != case.shape[1] else {}
    mask = case.document_mask(device)  # (packed documents: the mask, causal in it; else is_causal)
    plain = {"is_causal": case.causal, "dropout_p": case.dropout, **gqa}

    def sdpa(q, k, v):
        kw = plain if mask is None else {  # (a probe's shorter q, k: the mask's top-left corner)
            **plain, "is_causal": False, "attn_mask": mask[..., :q.shape[2], :k.shape[2]]}
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, **kw)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return sdpa


def _sdpa_backends(case: Case, device: str) -> dict[str, object]:
    """name -> SDPBackend (None: PyTorch's own choice) of each SDPA backend that runs case."""
    if device == "cpu":
        return {"sdpa": None}  # the CPU dispatches to its flash kernel; there is no other choice
    from torch.nn.attention import SDPBackend

    out = {}
    for name, b in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                    ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            q = torch.randn(1, case.shape[1], 128, case.shape[3], device=device, dtype=case.dtype)
            k = torch.randn(1, case.kv_shape[1], 128, case.shape[3], device=device, dtype=case.dtype)
            v = torch.randn(1, case.kv_shape[1], 128, case.v_shape[3], device=device, dtype=case.dtype)
            _sdpa_fn(case, b, device)(q, k, v)
            out[name] = b
        except RuntimeError:  # not built, or not for this dtype / head dim / GPU
            pass
    return out


# Eager attention (and torch.compile of it, which keeps the scores) materializes the (S, S)
# scores: cases whose scores pass this are left out of those providers.
EAGER_SCORES_LIMIT = 4 << 30


def _float32_scores_bytes(case: Case) -> int:
    B, H, S, _ = case.shape
    return B * H * S * S * 4


def _eager_fn(case: Case, device: str) -> Callable[..., Tensor]:
    if case.op == "attention":
        return _eager_attention(case, device)
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


def _lmfast_fn(case: Case, backend: str, device: str) -> Callable[..., Tensor]:
    if case.op == "attention":
        cu = case.cu_seqlens(device)  # (packed documents: their boundaries, in place of the others' mask)
        return lambda q, k, v: lmfast.ops.attention(q, k, v, causal=case.causal, dropout_p=case.dropout,
                                                    softcap=case.softcap or None, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                    backend=backend)
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
            leaves = list(ins.values())
            if case.compute_bound:  # forward + backward, a new graph each call
                dy = torch.randn_like(fn(**ins))
                return Bound(lambda: fn(**ins), lambda: torch.autograd.grad(fn(**ins), leaves, dy))
            y = fn(**ins)
            dy = torch.randn_like(y)
            return Bound(lambda: fn(**ins),
                         lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True))
        return build

    table = {}
    # CPU: the C++ kernels; CUDA: Triton's and the CUDA C++ ones (the interpreter is never timed)
    for ours in (["cpu"] if device == "cpu" else ["triton", "cuda"]):
        if lmfast.backends()[ours].available:
            table[f"lmfast-{ours}"] = bind(lambda ours=ours: _lmfast_fn(case, ours, device))
    if case.op == "attention" and not case.softcap:
        for name, b in _sdpa_backends(case, device).items():
            table[name] = bind(lambda b=b: _sdpa_fn(case, b, device))
    if case.op != "attention" or _float32_scores_bytes(case) <= EAGER_SCORES_LIMIT:
        table["eager"] = bind(lambda: _eager_fn(case, device))
        table["compile"] = bind(lambda: _compiled(case, device))
    if case.op == "rms_norm" and hasattr(F, "rms_norm"):
        table["torch.rms_norm"] = bind(lambda: lambda x, weight: F.rms_norm(x, (x.shape[-1],), weight, 1e-6))
    if case.ceiling == "copy":
        table["copy"] = bind(lambda: lambda **ins: ins["x"].clone(), grad_too=False)
    else:
        def matmul():
            n = MATMUL_N["cpu" if device == "cpu" else "cuda"]
            a = torch.randn(n, n, device=device, dtype=case.dtype)
            return Bound(lambda: a @ a, None)
        table["matmul"] = matmul
    return table


def ceiling_work(case: Case, device: str) -> float:
    """Work of one call of the ceiling provider, in case.unit's units."""
    if case.ceiling == "copy":
        return case.work("fwd")
    n = MATMUL_N["cpu" if device == "cpu" else "cuda"]
    return 2 * n ** 3 / 1e12


def seconds(fn: Callable[[], object], device: str, min_run_time: float) -> float:
    """Median time of one call (torch.utils.benchmark synchronizes CUDA), on all of torch's
    threads: Timer's own default is one thread."""
    from torch.utils.benchmark import Timer

    fn()  # warm up (compiles, autotunes)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


@dataclass
class Result:
    case: str
    op: str
    shape: list[int]
    dtype: str
    direction: str       # fwd | bwd | fwd+bwd
    provider: str
    seconds: float
    rate: float          # work per second in `unit`
    unit: str            # GB/s (bandwidth) or TFLOP/s
    frac_of_ceiling: float  # rate / the same-run rate of the ceiling provider (copy or matmul)
    vs_eager: float | None = None    # eager's time / this time (> 1: faster than eager)
    vs_compile: float | None = None
    vs_sdpa: float | None = None     # attention: the fastest SDPA backend's time / this time


def steps(selected: list[Case], rounds: int) -> int:
    """Progress steps of run(): per case, preparing, then each round."""
    return len(selected) * (rounds + 1)


def run(selected: list[Case], device: str, *, min_run_time: float = 0.2, rounds: int = 3,
        progress: Callable[[str], None] | None = None) -> list[Result]:
    """Times every provider of every case in both directions. Providers (and the ceiling) are
    timed in `rounds` interleaved rounds and each keeps its best median, so a slow spell of a
    shared machine does not land on one provider only."""
    results: list[Result] = []
    for case in selected:
        if progress:
            progress(f"{case.name}: preparing (torch.compile takes a while)")
        bound = {name: build() for name, build in providers(case, device).items()}
        timed = {(name, d): (b.forward if d == "fwd" else b.backward)
                 for name, b in bound.items() for d in case.directions
                 if (b.forward if d == "fwd" else b.backward) is not None}
        best = {key: float("inf") for key in timed}
        for r in range(rounds):
            if progress:
                progress(f"{case.name}: round {r + 1}/{rounds}")
            for key, fn in timed.items():
                best[key] = min(best[key], seconds(fn, device, min_run_time))
        del bound, timed
        ceiling_rate = ceiling_work(case, device) / best[(case.ceiling, "fwd")]
        for direction in case.directions:
            row = {name: t for (name, d), t in best.items() if d == direction}
            sdpa = min((t for name, t in row.items() if name.startswith("sdpa")), default=None)
            for name, t in row.items():
                work = ceiling_work(case, device) if name == case.ceiling else case.work(direction)
                rate = work / t / (1e9 if case.unit == "GB/s" else 1)
                ratio = (lambda other: other / t if other is not None and name != case.ceiling else None)
                results.append(Result(
                    case.name, case.op, list(case.shape), str(case.dtype).removeprefix("torch."),
                    direction, name, t, rate, case.unit,
                    rate / (ceiling_rate / (1e9 if case.unit == "GB/s" else 1)),
                    ratio(row.get("eager")), ratio(row.get("compile")), ratio(sdpa)))
    return results


def environment(device: str) -> dict[str, str]:
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "lmfast": lmfast.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": device, "threads": str(torch.get_num_threads())}
    if device == "cpu":
        from . import _extension

        env["device_name"] = _cpu_name()
        env["cpu_kernels"] = _cpu_kernel_level()  # the ISA level of lmfast's loaded CPU kernels
        env["bf16_attention"] = _extension.bf16_attention_unit() or "none"  # amx, avx512bf16 or sgemm
    else:
        env["device_name"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    else:
        if device != "cpu":  # (LMFAST_AUTOTUNE=0 or deterministic algorithms: each head-dim bucket's first tile)
            from .kernels import attention as triton_attention

            env["triton_tiles"] = "autotuned" if triton_attention.autotuning() else "fixed"
    return env


def _cpu_kernel_level() -> str:
    from . import _extension

    status = _extension.status()
    return status.isa if status.loaded else "none"


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
    lines = [f"{'case':42s} {'dir':7s} {'provider':15s} {'time':>10s} {'rate':>13s} {'of ceil':>7s} "
             f"{'vs eager':>8s} {'vs compile':>10s} {'vs sdpa':>8s}"]
    last = None
    for r in results:
        key = (r.case, r.direction)
        if last is not None and key != last:
            lines.append("")
        last = key
        t = f"{r.seconds * 1e3:8.3f}ms"
        rate = f"{r.rate:7.3f} {r.unit}" if r.unit == "TFLOP/s" else f"{r.rate:7.1f} {r.unit}"
        ratios = [f"{x:.2f}x" if x else "" for x in (r.vs_eager, r.vs_compile, r.vs_sdpa)]
        lines.append(f"{r.case:42s} {r.direction:7s} {r.provider:15s} {t:>10s} {rate:>13s} {r.frac_of_ceiling:6.0%} "
                     f"{ratios[0]:>8s} {ratios[1]:>10s} {ratios[2]:>8s}")
    return "\n".join(lines)


@functools.cache
def _ceiling_rate(case: Case, device: str) -> float:
    """Same-run rate of the case's ceiling provider, measured once per pytest session."""
    t = seconds(providers(case, device)[case.ceiling]().forward, device, 0.3)
    return ceiling_work(case, device) / t


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
    rounds = 5 if case.compute_bound and device == "cpu" else 20
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.disabled:  # --benchmark-disable, or xdist: each case ran once, untimed
        return
    work = ceiling_work(case, device) if provider == case.ceiling else case.work(direction)
    rate = work / benchmark.stats.stats.median
    scale = 1e9 if case.unit == "GB/s" else 1
    benchmark.extra_info.update({case.unit: round(rate / scale, 3),
                                 "frac_of_ceiling": round(rate / _ceiling_rate(case, device), 3),
                                 "device": device})


def _lmfast_providers(cells: dict) -> list[str]:
    """The lmfast providers with a forward result among one case's (provider, direction) cells."""
    return [p for p, d in cells if p.startswith("lmfast-") and d == "fwd"]


def _label(case: str, provider: str, cells: dict) -> str:
    """The case's name, with the backend when several lmfast backends ran (triton and cuda)."""
    return case if len(_lmfast_providers(cells)) == 1 else f"{case} ({provider[len('lmfast-'):]})"


def markdown_summary(report: dict) -> str:
    """README tables from a `lmfast bench` JSON report: per case, lmfast's forward rate and
    fraction of the ceiling, and its speedups over the other providers in both directions."""
    env = report["environment"]
    rows = {}
    for r in report["results"]:
        rows.setdefault(r["case"], {})[(r["provider"], r["direction"])] = r

    def ratio(x):
        return f"{x:.2f}x" if x else "-"

    lines = [f"{env['device_name']}, torch {env['torch']}, {env['date'][:10]} (`lmfast bench --size {report['size']}`)"]
    memory = [(c, cells) for c, cells in rows.items() if next(iter(cells.values()))["unit"] == "GB/s"]
    compute = [(c, cells) for c, cells in rows.items() if next(iter(cells.values()))["unit"] == "TFLOP/s"]
    if memory:
        lines += ["", "| case | lmfast fwd GB/s | of copy | fwd vs eager | fwd vs compile | bwd vs eager | bwd vs compile |",
                  "|---|---|---|---|---|---|---|"]
        for case, cells in memory:
            for ours in _lmfast_providers(cells):
                f, b = cells[(ours, "fwd")], cells.get((ours, "bwd"), {})
                lines.append(f"| {_label(case, ours, cells)} | {f['rate']:.1f} | {f['frac_of_ceiling']:.0%} | "
                             f"{ratio(f['vs_eager'])} | {ratio(f['vs_compile'])} | {ratio(b.get('vs_eager'))} | "
                             f"{ratio(b.get('vs_compile'))} |")
    if compute:
        lines += ["", "| case | lmfast fwd TFLOP/s | of matmul | fwd vs SDPA | fwd vs eager | fwd+bwd TFLOP/s "
                      "| fwd+bwd vs SDPA | fwd+bwd vs eager |",
                  "|---|---|---|---|---|---|---|---|"]
        for case, cells in compute:
            for ours in _lmfast_providers(cells):
                f, b = cells[(ours, "fwd")], cells.get((ours, "fwd+bwd"), {})
                lines.append(f"| {_label(case, ours, cells)} | {f['rate']:.3f} | {f['frac_of_ceiling']:.0%} | "
                             f"{ratio(f['vs_sdpa'])} | {ratio(f['vs_eager'])} | {b.get('rate', 0):.3f} | "
                             f"{ratio(b.get('vs_sdpa'))} | {ratio(b.get('vs_eager'))} |")
    return "\n".join(lines)
