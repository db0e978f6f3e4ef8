"""Backend availability, "auto" selection, LMFAST_BACKEND, and how the C++ extension loads."""

import os
import subprocess
import tempfile
import sys

import pytest
import torch

import lmfast
from lmfast import _backends


def test_backends_lists_every_backend_with_a_reason():
    table = lmfast.backends()
    assert list(table) == ["torch", "cpu", "triton", "cuda"]
    for status in table.values():
        assert isinstance(status, lmfast.BackendStatus) and status.detail
    assert table["torch"].available


def test_cpu_kernels_are_built():
    # CI installs with the C++ kernels; losing them must fail loudly, not skip.
    status = lmfast.backends()["cpu"]
    assert status.available, status.detail


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    assert _backends.resolve("auto", "softmax", torch.device("cpu"), torch.float32) == "cpu"
    assert _backends.resolve("auto", "softmax", torch.device("meta"), torch.float32) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_triton_for_cuda_tensors():
    assert _backends.resolve("auto", "softmax", torch.device("cuda"), torch.bfloat16) == "triton"
    assert _backends.resolve("auto", "softmax", torch.device("cuda"), torch.float64) == "torch"


def test_env_overrides_auto(set_backend_env):
    set_backend_env("torch")
    assert _backends.resolve("auto", "softmax", torch.device("cpu"), torch.float32) == "torch"
    assert _backends.resolve("cpu", "softmax", torch.device("cpu"), torch.float32) == "cpu"  # explicit wins


def test_env_override_naming_an_impossible_backend_fails_clearly(set_backend_env):
    set_backend_env("cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        lmfast.ops.softmax(torch.randn(3, 4))


def test_every_backend_gives_the_same_answer_through_auto(set_backend_env):
    x = torch.randn(5, 16)
    want = lmfast.ops.rms_norm(x, backend="torch")
    set_backend_env("cpu")
    torch.testing.assert_close(lmfast.ops.rms_norm(x), want)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    # Outside the checkout: `python -c` puts the working directory first on sys.path, and the
    # source folder's lmfast (no compiled libraries) would build its kernels on first use.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env={**os.environ, **env}, timeout=600)


def test_without_cpp_kernels_auto_falls_back_with_one_warning():
    code = (
        "import warnings, torch, lmfast\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    a = lmfast.ops.layer_norm(torch.randn(3, 8))\n"
        "    b = lmfast.ops.softmax(torch.randn(3, 8))\n"
        "print(len(w), w[0].message if w else '')\n"
        "print(lmfast.backends()['cpu'])\n"
    )
    out = _run(code, LMFAST_DISABLE_CPP="1")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[:2]
    assert first.startswith("1 ") and "falling back to the PyTorch reference" in first
    assert "disabled by LMFAST_DISABLE_CPP=1" in second


def test_one_openmp_runtime_is_shared_with_torch():
    # -fopenmp links libgomp.so.1; torch's copy of it must be the one in use (one thread pool).
    code = (
        "import torch, lmfast\n"
        "lmfast.ops.softmax(torch.randn(64, 64), backend='cpu')\n"
        "maps = {l.split()[-1] for l in open('/proc/self/maps') if 'gomp' in l}\n"
        "print('\\n'.join(sorted(maps)))\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    libs = out.stdout.split()
    assert len(libs) == 1, f"more than one OpenMP runtime loaded: {libs}"


def test_cpu_kernels_obey_set_num_threads():
    code = (
        "import torch, lmfast, time\n"
        "torch.set_num_threads(1)\n"
        "x = torch.randn(256, 4096)\n"
        "lmfast.ops.layer_norm(x, backend='cpu')\n"
        "print(torch.get_num_threads())\n"
    )
    out = _run(code)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr


@pytest.mark.slow
def test_first_use_build(tmp_path):
    """The path a user gets from `pip install .` with build isolation (no lmfast._C): the
    sources are compiled on first use into the cache, announced once, then reused."""
    code = (
        "import sys, lmfast._extension as ext\n"
        "sys.modules['lmfast._C'] = None  # hide the ahead-of-time build\n"
        "import torch, lmfast\n"
        "st = lmfast.backends()['cpu']\n"
        "print(st.available, st.detail)\n"
        "x = torch.randn(7, 33)\n"
        "torch.testing.assert_close(lmfast.ops.layer_norm(x, backend='cpu'), lmfast.ops.layer_norm(x, backend='torch'))\n"
    )
    # two processes start the build at once: they take turns, both load the same libraries
    env = {**os.environ, "LMFAST_CACHE_DIR": str(tmp_path)}
    both = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tempfile.gettempdir(), env=env) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in both]
    for p, (out, err) in zip(both, outs):
        assert p.returncode == 0, err
        assert out.startswith("True built on first use"), out
    assert sum("compiling the C++ CPU kernels" in err for _, err in outs) >= 1
    second = _run(code, LMFAST_CACHE_DIR=str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert "compiling" not in second.stderr  # cached
    # a build killed while linking: a truncated library (loading it crashed the process with
    # SIGBUS), and torch's lock file left behind (every later build waited for it forever):
    # detected, rebuilt, loaded
    kernels = next(tmp_path.glob("lmfast_cpu_*/lmfast_cpu_*.so"))
    kernels.write_bytes(kernels.read_bytes()[:1000])
    (kernels.parent / "lock").touch()
    third = _run(code, LMFAST_CACHE_DIR=str(tmp_path))
    assert third.returncode == 0, third.stderr
    assert third.stdout.startswith("True built on first use"), third.stdout + third.stderr
    assert "is incomplete (a build was interrupted); rebuilding it" in third.stderr


def test_no_compiler_is_reported_and_ops_fall_back(tmp_path):
    code = (
        "import sys, warnings\n"
        "sys.modules['lmfast._C'] = None  # as after `pip install .` with build isolation\n"
        "import torch, lmfast\n"
        "print(lmfast.backends()['cpu'])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    lmfast.ops.rms_norm(torch.randn(2, 8))\n"
        "print(len(w))\n"
    )
    out = _run(code, CXX="/nonexistent/c++", LMFAST_CACHE_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    status, warned = out.stdout.splitlines()[:2]
    assert "no C++ compiler: '/nonexistent/c++' is not on PATH" in status
    assert warned == "1"
