"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only` (CPU sizes) or with
`--lmfast-size=full` (GPU sizes). Cases and providers come from lmfast.benchmarking, the same
definitions `lmfast bench` uses; each benchmark's extra_info carries its rate (GB/s, or
TFLOP/s for attention) and the fraction of the same-run ceiling (clone, or a large matmul)."""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--lmfast-size", choices=["quick", "full"], default="quick",
                     help="benchmark sizes: quick (CPU, default) or full (GPU)")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    from lmfast import benchmarking

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = metafunc.config.getoption("--lmfast-size")
    op = metafunc.module.OP
    params = []
    for case in benchmarking.cases(size, device, ops=[op]):
        for direction in case.directions:
            for provider in benchmarking.providers(case, device):
                if provider == case.ceiling and direction != "fwd":
                    continue
                params.append(pytest.param((case, direction, provider, device),
                                           id=f"{case.name.replace(' ', '-')}-{direction}-{provider}"))
    metafunc.parametrize("bench_case", params)
