"""`lmfast info` and `lmfast bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# lmfast.benchmarking.OPS, spelled out so that `lmfast --help` does not import torch
BENCH_OPS = ("layer_norm", "rms_norm", "softmax", "attention")


def _info(args) -> int:
    import torch

    import lmfast
    from lmfast import benchmarking

    env = benchmarking.environment("cuda" if torch.cuda.is_available() else "cpu")
    print(f"lmfast {lmfast.__version__}  torch {env['torch']}  triton {env.get('triton', 'not installed')}  "
          f"python {env['python']}")
    print(f"device: {env['device_name']}")
    from lmfast._backends import KERNEL_OPS

    print("backends:")
    for status in lmfast.backends().values():
        print(f"  {status}")
        ops = "every op (the reference)" if status.name == "torch" else ", ".join(sorted(KERNEL_OPS[status.name])) or "none yet"
        print(f"          ops: {ops}")
    return 0


def _bench(args) -> int:
    import torch

    from lmfast import benchmarking

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = benchmarking.DTYPES[args.dtype] if args.dtype else None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as e:
        print(f"lmfast bench: cannot write to --out {out}: {e.strerror}", file=sys.stderr)
        return 2
    selected = benchmarking.cases(args.size, device, dtype, args.ops)
    print(f"lmfast bench: {len(selected)} cases on {device} ({args.size})", file=sys.stderr)
    path = out / f"bench-{device}.json"
    environment = benchmarking.environment(device)
    results = []
    for i, case in enumerate(selected):  # results are printed and saved case by case
        done = benchmarking.run([case], device, min_run_time=args.min_time, rounds=args.rounds,
                                progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
        table = benchmarking.format_table(done)
        print(table if i == 0 else "\n" + table.split("\n", 1)[1], flush=True)
        results += done
        path.write_text(json.dumps({"environment": environment, "size": args.size,
                                    "results": benchmarking.as_dicts(results)}, indent=1))
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmfast", description="fused Transformer kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends run here (and why not)")
    bench = sub.add_parser("bench", help="benchmark lmfast against PyTorch eager and torch.compile")
    bench.add_argument("--size", choices=["quick", "full"], default="quick",
                       help="quick: CPU-friendly sizes (default); full: GPU sizes")
    bench.add_argument("--ops", nargs="+", default=list(BENCH_OPS), choices=BENCH_OPS)
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present, else cpu")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--out", default="lmfast-bench", help="directory for the JSON results")
    bench.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per measurement")
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each result is the best")
    args = parser.parse_args(argv)
    return {"info": _info, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
