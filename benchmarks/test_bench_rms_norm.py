"""rms_norm: lmfast vs PyTorch eager vs torch.compile (and the clone ceiling), forward and
backward. Parametrized by benchmarks/conftest.py from lmfast.benchmarking."""

from lmfast import benchmarking

OP = "rms_norm"


def test_rms_norm(benchmark, bench_case):
    benchmarking.pytest_benchmark(benchmark, *bench_case)
