"""What `lmfast bench` writes and prints: the summary table, the comparison with an earlier
run (--compare), and the PNG plots.

A report is the JSON `lmfast bench` writes:
    {"environment": {date, lmfast, torch, triton, transformers, device, device_name, ...},
     "size": "quick" | "full", "dtype": ...,
     "results": [benchmarking.Result as a dict, ...],      # every provider, every direction
     "overhead": [overhead.OverheadResult as a dict, ...],  # per-call cost at decode sizes
     "models":  [model_benchmarks.ModelResult as a dict, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path


class ReportError(Exception):
    """An earlier report that cannot be read (the CLI prints it in one line)."""


def load(path: str | Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(report, dict) or "environment" not in report or \
            not isinstance(report.get("results"), list):
        raise ReportError(f"{path} is not an `lmfast bench` report (no environment/results)")
    return report


def _ours(cells: dict) -> list[str]:
    """The lmfast providers of one (case, direction)'s cells (provider -> result): one, or on a
    GPU both triton and cuda."""
    return [p for p in cells if p.startswith("lmfast-")]


def _by_case(results: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(case, direction) -> provider -> result, in run order."""
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results:
        rows.setdefault((r["case"], r["direction"]), {})[r["provider"]] = r
    return rows


def _x(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio else "-"


def summary_table(report: dict) -> str:
    """One row per (case, direction): lmfast's time and rate, the fraction of the same-run
    ceiling (copy bandwidth or matmul rate), and its speedup over the other providers; then
    one row per model workload."""
    lines = []
    rows = _by_case(report["results"])
    if rows:
        lines.append(f"{'case':42s} {'dir':7s} {'lmfast':>9s} {'rate':>13s} {'of ceiling':>10s} "
                     f"{'vs eager':>8s} {'vs compile':>10s} {'vs sdpa':>8s}")
        for (case, direction), cells in rows.items():
            ours_all = _ours(cells)
            for ours in ours_all:
                r = cells[ours]
                label = case if len(ours_all) == 1 else f"{case} ({ours[len('lmfast-'):]})"
                rate = f"{r['rate']:.3f} {r['unit']}" if r["unit"] == "TFLOP/s" else f"{r['rate']:.1f} {r['unit']}"
                lines.append(f"{label:42s} {direction:7s} {r['seconds'] * 1e3:7.2f}ms {rate:>13s} "
                             f"{r['frac_of_ceiling']:>10.0%} {_x(r['vs_eager']):>8s} {_x(r['vs_compile']):>10s} "
                             f"{_x(r['vs_sdpa']):>8s}")
        lines.append("speedup = the provider's time / lmfast's (> 1: lmfast is faster); ceiling: the same-run "
                     "x.clone() bandwidth (norms, softmax) or large-matmul rate (attention)")
    if report.get("overhead"):
        from .overhead import format_table

        if lines:
            lines.append("")
        lines.append(format_table(report["overhead"]))
    models = report.get("models") or []
    if models:
        if lines:
            lines.append("")
        lines.append(f"{'model workload':28s} {'unpatched':>14s} {'patched':>14s} {'speedup':>8s} "
                     f"{'middle half':>12s}  outputs")
        for m in models:
            q = m.get("speedup_quartiles")
            spread = f"{q[0]:.2f}-{q[1]:.2f}" if q else ""
            unit = m["unit"].replace("tokens", "tok")
            lines.append(f"{m['workload']:28s} {m['unpatched']:>7.1f} {unit:6s} {m['patched']:>7.1f} {unit:6s} "
                         f"{m['speedup']:>7.2f}x {spread:>12s}  {m['agreement']}")
        lines.append("models: two copies of the model, one patched, timed call by call (decoding: step by step) "
                     "interleaved and summed in blocks; speedup = the median block's patched/unpatched rate, "
                     "middle half = the blocks' quartiles (this run's precision)")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def compare(before: dict, now: dict) -> str:
    """Change of every (case, direction, provider) timed in both reports (time before / time
    now: > 1 is faster now), and of each model workload's patched rate and speedup."""
    env_b, env_n = before["environment"], now["environment"]
    lines = [f"against {env_b.get('date', '?')} ({env_b.get('device_name', '?')}, lmfast {env_b.get('lmfast', '?')}, "
             f"torch {env_b.get('torch', '?')})"]
    if env_b.get("device_name") != env_n.get("device_name"):
        lines.append(f"note: the earlier run was on another device ({env_b.get('device_name')})")
    if "triton_tiles" in env_b and "triton_tiles" in env_n and env_b["triton_tiles"] != env_n["triton_tiles"]:
        lines.append(f"note: Triton's attention tiles were {env_b['triton_tiles']} then, {env_n['triton_tiles']} now")
    old = {(r["case"], r["direction"], r["provider"]): r for r in before["results"]}
    matched = 0
    table = [f"{'case':42s} {'dir':7s} {'provider':15s} {'before':>10s} {'now':>10s} {'change':>8s}"]
    for r in now["results"]:
        b = old.get((r["case"], r["direction"], r["provider"]))
        if b is None:
            continue
        matched += 1
        table.append(f"{r['case']:42s} {r['direction']:7s} {r['provider']:15s} {b['seconds'] * 1e3:8.3f}ms "
                     f"{r['seconds'] * 1e3:8.3f}ms {b['seconds'] / r['seconds']:7.2f}x")
    if matched:
        lines += table + ["change = time before / time now (> 1: faster now)"]
    old_overhead = {(r["case"], r["direction"]): r for r in before.get("overhead") or []}
    for r in now.get("overhead") or []:
        b = old_overhead.get((r["case"], r["direction"]))
        if b is None:
            continue
        matched += 1
        lines.append(f"{r['case']:34s} {r['direction']:7s} lmfast {b['ours_us']:.1f} -> {r['ours_us']:.1f} us a call, "
                     f"ratio to {r['theirs']} {b['ratio']:.2f}x -> {r['ratio']:.2f}x")
    old_models = {m["workload"]: m for m in before.get("models") or []}
    for m in now.get("models") or []:
        b = old_models.get(m["workload"])
        if b is None:
            continue
        matched += 1
        lines.append(f"{m['workload']:28s} patched {b['patched']:.1f} -> {m['patched']:.1f} {m['unit']}, "
                     f"speedup over unpatched {b['speedup']:.2f}x -> {m['speedup']:.2f}x")
    if not matched:
        lines.append("nothing to compare: the two runs share no case (other ops, sizes or dtype?)")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> Path:
    """Writes a PNG: per (case, direction), lmfast's speedup over each other provider (log
    scale, 1x marked), and every provider's fraction of the ceiling; model workloads' speedup
    in a third panel when there are any. Needs matplotlib (the [bench] extra)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [(key, cells) for key, cells in _by_case(report["results"]).items() if _ours(cells)]
    per_call = report.get("overhead") or []
    models = report.get("models") or []
    panels = (2 if rows else 0) + (1 if per_call else 0) + (1 if models else 0)
    if not panels:
        raise ValueError("nothing to plot: the report has no results")
    height = max(3.0, 0.42 * max(sum(len(_ours(c)) for _, c in rows), len(per_call), len(models)) + 1.6)
    widths = ([1.0, 1.0] if rows else []) + ([0.6] if per_call else []) + ([0.6] if models else [])
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * sum(widths), height), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    axes = list(axes[0])
    env = report["environment"]
    fig.suptitle(f"lmfast bench, {env.get('device_name', '?')}, torch {env.get('torch', '?')}, "
                 f"{env.get('date', '')[:10]}", fontsize=10)
    if rows:
        # one bar group per (case, direction, lmfast backend)
        ours_rows = [(f"{case} {direction}" + (f" ({p[len('lmfast-'):]})" if len(_ours(cells)) > 1 else ""), cells[p])
                     for (case, direction), cells in rows for p in _ours(cells)]
        labels = [label for label, _ in ours_rows]
        y = list(range(len(ours_rows)))
        ax = axes.pop(0)
        others = [(field, name) for field, name in
                  (("vs_eager", "eager"), ("vs_compile", "torch.compile"), ("vs_sdpa", "SDPA"))
                  if any(r[field] for _, r in ours_rows)]
        h = 0.8 / len(others)
        for i, (field, name) in enumerate(others):
            ax.barh([v + (i - (len(others) - 1) / 2) * h for v in y],
                    [r[field] or 0 for _, r in ours_rows], height=h, label=f"vs {name}")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))  # ... 0.5x 1x 2x 4x ...
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("lmfast speedup (other's time / lmfast's; > 1: lmfast faster)")
        ax.legend(fontsize=7)
        ax.grid(axis="x", alpha=0.3)

        ax = axes.pop(0)
        providers = []
        for _, cells in rows:
            providers += [p for p in cells if p not in providers and p not in ("copy", "matmul")]
        h = 0.8 / len(providers)
        for i, p in enumerate(providers):
            ax.barh([v + (i - (len(providers) - 1) / 2) * h for v in y],
                    [cells[p]["frac_of_ceiling"] * 100 if p in cells else 0 for _, cells in rows],
                    height=h, label=p)
        ax.axvline(100, color="black", linewidth=0.8)
        ax.set_yticks(y, [""] * len(y))
        ax.invert_yaxis()
        ax.set_xlabel("% of the same-run ceiling (copy bandwidth; matmul rate for attention)")
        ax.legend(fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    if per_call:
        ax = axes.pop(0)
        y = list(range(len(per_call)))
        ax.barh(y, [r["ratio"] for r in per_call], color="tab:purple")
        for v, r in zip(y, per_call):
            ax.plot([r["target"]] * 2, [v - 0.4, v + 0.4], color="tab:red", linewidth=1.5)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(y, [f"{r['case']} {r['direction']}" for r in per_call], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("per-call time, lmfast / replaced module\n(red: the target; < 1: lmfast costs less)")
    if models:
        ax = axes.pop(0)
        y = list(range(len(models)))
        ax.barh(y, [m["speedup"] for m in models], color="tab:green")
        for v, m in zip(y, models):
            q = m.get("speedup_quartiles")
            if q:
                ax.plot(q, [v, v], color="black", linewidth=1.5)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(y, [m["workload"] for m in models], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("patched / unpatched rate\n(line: middle half of the timed pairs)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(report: dict) -> str:
    """README tables of a report: per case, lmfast's forward rate and fraction of the ceiling
    and its speedups in both directions; per model workload, rates and speedup."""
    from .benchmarking import markdown_summary

    text = markdown_summary(report) if report["results"] else ""
    if report.get("overhead"):
        text += ("\n\n| per-call cost, decode size | direction | replaced module | its us | lmfast us | ratio |\n"
                 "|---|---|---|---|---|---|\n")
        text += "\n".join(f"| {r['case']} | {r['direction']} | {r['theirs']} | {r['theirs_us']:.1f} | "
                          f"{r['ours_us']:.1f} | {r['ratio']:.2f}x |" for r in report["overhead"])
    models = report.get("models") or []
    if models:
        text += ("\n\n| model workload | unpatched | patched | speedup (middle half) | outputs |\n"
                 "|---|---|---|---|---|\n")
        for m in models:
            q = m.get("speedup_quartiles")
            spread = f" ({q[0]:.2f}-{q[1]:.2f})" if q else ""
            text += (f"| {m['workload']} | {m['unpatched']:.1f} {m['unit']} | {m['patched']:.1f} {m['unit']} | "
                     f"{m['speedup']:.2f}x{spread} | {m['agreement']} |\n")
    return text.strip()
