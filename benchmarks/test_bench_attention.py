"""attention: lmfast vs F.scaled_dot_product_attention (each backend the device runs) vs eager
attention (matmul-softmax-matmul) vs torch.compile of it, forward and forward+backward, causal
and not, in TFLOP/s. Parametrized by benchmarks/conftest.py from lmfast.benchmarking."""

from lmfast import benchmarking

OP = "attention"


def test_attention(benchmark, bench_case):
    benchmarking.pytest_benchmark(benchmark, *bench_case)
