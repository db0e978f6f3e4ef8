"""softmax: lmfast vs PyTorch eager vs torch.compile (and the clone ceiling), forward and
backward. Parametrized by benchmarks/conftest.py from lmfast.benchmarking."""

from lmfast import benchmarking

OP = "softmax"


def test_softmax(benchmark, bench_case):
    benchmarking.pytest_benchmark(benchmark, *bench_case)
