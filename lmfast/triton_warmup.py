"""Compiles, in parallel processes, the Triton attention kernels that `lmfast bench --size full
--ops attention` autotunes over on a GPU, so that the benchmark finds them in Triton's on-disk
cache:

    python -m lmfast.triton_warmup            (scripts/gpu_check.sh runs it before that benchmark)

Triton's autotuner compiles a kernel's candidate tiles one after another in the process that
times them: the forward's 4 and the backward's 3 + 3 for each flag set (causal, dropout,
softcap, packed documents, head dims), ~10 compiles of 3.5-4 s each on a GPU machine's core
(Triton 3.6, sm_90; benchmarks/results/cpu-epyc-zen4-2026-12-06-torch-2.11-cu130-build.txt),
~5 minutes for the benchmark's 8 flag sets. Here each flag set autotunes in a process of its
own, all at once, on a copy of its case shrunk to 64 tokens: the integers a compiled kernel is
specialized on (head counts, head dims, lengths as multiples of 16, the number of documents
as neither 1 nor one of 16) are those of the full case, so the binaries are the ones the
benchmark asks for. Only the binaries count: the tiles these processes pick, timed side by
side on one GPU, are not kept (the autotuner keeps its choices in memory), and the benchmark
times every candidate again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

WARM_TOKENS = 64
WARM_DOCUMENTS = (20, 24, 20)  # (three documents: the kernels' n_docs specializes as the benchmark's 8 does)


def flag_set(case) -> tuple:
    """What picks an attention case's compiled kernels, beyond its dtype and the lengths."""
    heads, head_dim = case.shape[1], case.shape[3]  # (B, H, S, D)
    return (case.dtype, heads, case.kv_heads, head_dim, case.v_head_dim, case.causal, case.dropout > 0,
            case.softcap > 0, bool(case.documents))


def warm_cases(device: str = "cuda") -> list:
    """One case per flag set of the full attention benchmark on `device`, shrunk to WARM_TOKENS."""
    from . import benchmarking

    out, seen = [], set()
    for case in benchmarking.cases("full", device, ops=["attention"]):
        key = flag_set(case)
        if key in seen:
            continue
        seen.add(key)
        H, D = case.shape[1], case.shape[3]
        out.append(dataclasses.replace(case, shape=(1, H, WARM_TOKENS, D),
                                       documents=WARM_DOCUMENTS if case.documents else ()))
    return out


def _run_one(index: int) -> None:
    """Forward and backward of warm case `index` through Triton's kernels, autotuning them."""
    import torch

    from . import benchmarking

    bound = benchmarking.providers(warm_cases()[index], "cuda")["lmfast-triton"]()
    bound.forward()
    bound.backward()
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmfast.triton_warmup", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", type=int, help=argparse.SUPPRESS)  # (a worker: one case)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = p.parse_args(argv)
    if args.case is not None:
        _run_one(args.case)
        return 0

    cases = warm_cases()
    start = time.perf_counter()
    pending, running, failed = list(range(len(cases))), {}, 0
    try:
        while pending or running:
            while pending and len(running) < args.workers:
                index = pending.pop(0)
                errors = tempfile.TemporaryFile(mode="w+")
                cmd = [sys.executable, "-m", "lmfast.triton_warmup", "--case", str(index)]
                running[index] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors), errors)
            for index, (proc, errors) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[index]
                print(f"{cases[index].name}: {'ok' if proc.returncode == 0 else f'failed ({proc.returncode})'}",
                      flush=True)
                if proc.returncode != 0:
                    failed += 1
                    errors.seek(0)
                    print(errors.read()[-2000:], file=sys.stderr)
                errors.close()
            time.sleep(0.1)
    finally:  # interrupted (gpu_check's step limit): no compile may go on beside the benchmark
        for proc, errors in running.values():
            proc.kill()
            proc.wait()
            errors.close()
    print(f"triton_warmup: {len(cases)} flag sets, {failed} failed, {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
