"""`pytest benchmarks/ --benchmark-only`, the suite users run, still collects and runs: every
benchmark file, at both sizes' parametrizations. Timings are not checked here (speed is
measured in benchmarks/, never asserted in tests/): the cases run once each, untimed, as
pytest-benchmark does under --benchmark-disable and under xdist (where it disables itself;
the suite's bodies read no timing then: they once failed on benchmark.stats being None)."""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FILES = sorted(p.name for p in BENCHMARKS.glob("test_bench_*.py"))

# One or more cases of each file, the cheap ones: lmfast's forward of the memory-bound ops and
# of one attention case, the per-call rows without grad, the model's prefill rows.
CHEAP = ("lmfast-cpu and fwd and not attention or attention-4x12x1024x64-bfloat16-causal-fwd-lmfast-cpu"
         " or per_call and fwd or prefill")


def _pytest(*args: str) -> subprocess.CompletedProcess:
    # (run outside the checkout, so that the installed lmfast is the one imported, as for users)
    return subprocess.run([sys.executable, "-m", "pytest", str(BENCHMARKS), "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())


def _files(output: str, outcome: str = "") -> set[str]:
    """The benchmark files with a test id in pytest's output (followed by `outcome`, if given)."""
    return {m.group(1) for m in re.finditer(rf"(test_bench_\w+\.py)::\S+{' ' + outcome if outcome else ''}", output)}


def test_every_benchmark_file_runs_its_cases():
    assert len(FILES) >= 6, FILES
    done = _pytest("--benchmark-disable", "-v", "-k", CHEAP)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = _files(done.stdout, "PASSED")
    assert passed == set(FILES), (passed, FILES)


def test_both_sizes_collect():
    for size in ("quick", "full"):
        done = _pytest("--collect-only", "-q", f"--lmfast-size={size}")
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        collected = _files(done.stdout)
        assert collected == set(FILES), (size, collected)
