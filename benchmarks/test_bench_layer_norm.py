"""layer_norm: lmfast vs PyTorch eager vs torch.compile (and the clone ceiling), forward and
backward. Parametrized by benchmarks/conftest.py from lmfast.benchmarking."""

from lmfast import benchmarking

OP = "layer_norm"


def test_layer_norm(benchmark, bench_case):
    benchmarking.pytest_benchmark(benchmark, *bench_case)
