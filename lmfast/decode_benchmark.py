"""Decoding attention against a long KV cache on a GPU: one query row per head over 4k-64k
cached keys, grouped-query heads as Llama-family models decode (32 query heads over 8 kv heads,
head dim 128, bfloat16). The work is reading the cache, so each provider is reported as the
bandwidth of that read, against a same-run device copy (x.clone() of 1 GiB, read + write).

Providers: lmfast-cuda (the CUDA C++ split-K decode kernel), lmfast-triton, and
torch's scaled_dot_product_attention with enable_gqa (whichever SDPA backend it picks).

    python -m lmfast.decode_benchmark [--out decode.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import lmfast

SHAPES = [(1, 32, 8, 4096, 128), (8, 32, 8, 4096, 128), (1, 32, 8, 16384, 128), (4, 32, 8, 16384, 128),
          (1, 32, 8, 65536, 128)]  # (B, Hq, Hkv, cached keys, D)


def _time(fn, repeats: int = 5, calls: int = 20) -> float:
    """Median seconds a call, from CUDA events over `calls` back-to-back calls."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(samples)


def copy_bandwidth() -> float:
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    return 2 * x.numel() * x.element_size() / _time(lambda: x.clone())


def run() -> dict:
    copy = copy_bandwidth()
    rows = []
    available = lmfast.backends()
    for B, Hq, Hkv, Sk, D in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, Hkv, Sk, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, Hkv, Sk, D, device="cuda", dtype=torch.bfloat16, generator=g)
        cache_bytes = 2 * k.numel() * k.element_size()
        providers = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
        for name in ("cuda", "triton"):
            if available[name].available:
                providers[f"lmfast-{name}"] = lambda name=name: lmfast.ops.attention(q, k, v, backend=name)
        want = providers["sdpa"]().float()
        for name, fn in providers.items():
            err = (fn().float() - want).abs().max().item()
            t = _time(fn)
            rows.append({"shape": [B, Hq, Hkv, Sk, D], "provider": name, "seconds": t,
                         "cache_GBps": cache_bytes / t / 1e9, "of_copy": cache_bytes / t / copy,
                         "max_abs_diff_vs_sdpa": err})
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": copy / 1e9,
            "rows": rows}


def format_table(report: dict) -> str:
    lines = [f"decode attention, {report['device']}, torch {report['torch']}; copy {report['copy_GBps']:.0f} GB/s",
             f"{'B, Hq/Hkv, cached keys, D':28s} {'provider':14s} {'us':>8s} {'cache GB/s':>11s} {'of copy':>8s} "
             f"{'|diff| vs sdpa':>14s}"]
    for r in report["rows"]:
        B, Hq, Hkv, Sk, D = r["shape"]
        lines.append(f"{f'{B}, {Hq}/{Hkv}, {Sk}, {D}':28s} {r['provider']:14s} {r['seconds'] * 1e6:8.1f} "
                     f"{r['cache_GBps']:11.0f} {r['of_copy']:8.0%} {r['max_abs_diff_vs_sdpa']:14.2e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    report = run()
    print(format_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
