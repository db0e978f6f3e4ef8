"""Test setup. Kernel tests run for every kernel backend that this machine can run:

  cpu      C++ kernels on CPU tensors (always: a missing build is a failure, not a skip)
  triton   on CUDA tensors when a GPU is present, else on CPU tensors through the Triton
           interpreter (TRITON_INTERPRET=1, set here before anything imports triton), with
           fewer rows since the interpreter is slow
  cuda     the CUDA C++ kernels on CUDA tensors, when a GPU is present (the CPU machines
           compile-check them, test_cuda_build.py, and run them under the host emulator,
           test_cuda_emulation.py)

LMFAST_TEST_CPU_KERNELS=cuda-emulation puts the emulated CUDA kernels behind the C++ ops on CPU
tensors for the whole run (tests/cuda_emulation.py: install), so that backend "cpu" tests them
through api.cpp as backend "cuda" runs them on a GPU; only tests of the C++ path's contract
(float16/bfloat16/float32 inputs) make sense then: test_cuda_emulation.py runs the fuzz so.
"""

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


def _share_the_cores_between_xdist_workers() -> None:
    """pytest-xdist (the README's `-n auto`) runs a worker process per core, and torch would
    give each an OpenMP pool of a thread per core: n workers x n threads on n cores, whose
    idle threads spin on cores the other workers need (the suite took 12.5 min on 2 cores;
    9.1 with this). Each worker gets two threads at least, so every kernel test still runs its
    parallel loops on more than one thread, and waiting threads sleep instead of spinning.
    Both are read when torch loads OpenMP: this runs before anything here imports torch, and
    child processes (test_isa_levels.py) inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "torch" in sys.modules:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(2, cores // workers)))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_share_the_cores_between_xdist_workers()
import torch  # noqa: E402  (after the thread settings above)


def _load_cuda_emulation():
    """tests/cuda_emulation.py as a module (the importlib import mode has no sibling imports)."""
    name = "lmfast_tests_cuda_emulation"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("cuda_emulation.py"))
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_the_language_once_per_launch() -> None:
    """The Triton interpreter swaps the builtins of the language modules a @triton.jit function
    sees (triton.language, triton.language.core) for interpreted ones when a kernel launches
    (_patch_lang, undone when it ends), and again on every call of a @triton.jit helper inside
    it (~1 ms each, the scope thrown away): a third of the Triton tests' time, for nothing where
    the modules the helper sees are patched already. Here such a call patches nothing; one that
    sees another module (tl.sum sees triton.language.core) patches as before. What runs is
    unchanged; if the interpreter's internals differ from these, nothing is done."""
    import functools
    import inspect

    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or not hasattr(interpreter, "_LangPatchScope") or getattr(original, "_lmfast_once", False):
        return

    @functools.cache
    def languages(fn) -> frozenset:  # the modules _patch_lang patches for fn
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    patched = []  # per running launch (one at a time): the ids of the modules patched in it

    def patch_lang(fn):
        if patched and languages(fn) <= patched[-1]:
            return interpreter._LangPatchScope()  # inside a launch, these modules are patched already
        scope = original(fn)
        if patched:  # a helper that sees another module: patched now, for the rest of the launch
            patched[-1] = patched[-1] | languages(fn)
            return scope
        restore = scope.restore

        def restore_and_end():
            patched.pop()
            restore()
        scope.restore = restore_and_end
        patched.append(languages(fn))
        return scope
    patch_lang._lmfast_once = True
    interpreter._patch_lang = patch_lang


def _drop_the_interpreters_unread_overflow_checks() -> None:
    """With overflow sanitizing on (the interpreter's default), every int32 add, sub and mul in
    an interpreted kernel is redone in int64 and compared against int32's range, for a
    device_assert that the interpreter never checks (its options' debug is always False, so
    device_assert returns at once): about a third of the interpreted attention kernels' time,
    computed and thrown away. Turned off here; what the kernels compute is unchanged. If the
    interpreter's internals differ from these (or it checks asserts), nothing is done."""
    import dataclasses

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if (not dataclasses.is_dataclass(options) or getattr(options, "debug", True)
            or not getattr(options, "sanitize_overflow", False)):
        return
    builder.options = dataclasses.replace(options, sanitize_overflow=False)


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()
    _drop_the_interpreters_unread_overflow_checks()
if os.environ.get("LMFAST_TEST_CPU_KERNELS") == "cuda-emulation":  # (after TRITON_INTERPRET: it loads lmfast)
    _load_cuda_emulation().install()
# On a GPU, attention kernels run with one fixed tile config per head-dim bucket: autotuning
# every flag combination the tests run would compile each kernel several times over.
# (test_attention_kernels.py::test_autotuned_launch runs the autotuner once.)
os.environ.setdefault("LMFAST_AUTOTUNE", "0")


@dataclass(frozen=True)
class KernelBackend:
    name: str      # lmfast backend name
    device: str    # where its tensors live
    slow: bool     # the Triton interpreter: keep shapes small

    def rows(self, fast: int, slow: int = 16) -> int:
        """Row count for a test: fewer under the interpreter, but >= 16 where the error
        budget is checked (lmfast.testing: the RMS over fewer rows is a noisy statistic)."""
        return slow if self.slow else fast


KERNEL_BACKENDS = [
    KernelBackend("cpu", "cpu", slow=False),
    KernelBackend("triton", "cuda", slow=False) if HAS_CUDA else KernelBackend("triton", "cpu", slow=True),
]


def _cuda_cpp_available() -> bool:
    import lmfast

    return lmfast.backends()["cuda"].available


# The CUDA C++ kernels (backend "cuda") join on a GPU machine where lmfast._cuda loads; where
# it does not, test_cuda_build.py::test_cuda_backend_loads_on_a_gpu_machine_and_says_why_not_elsewhere fails (and the
# other backends are still tested).
if HAS_CUDA and _cuda_cpp_available():
    KERNEL_BACKENDS.append(KernelBackend("cuda", "cuda", slow=False))


@pytest.fixture(params=KERNEL_BACKENDS, ids=lambda b: f"{b.name}-{b.device}")
def kb(request) -> KernelBackend:
    """The kernel backend under test."""
    return request.param


@pytest.fixture(params=[torch.float32, torch.float16, torch.bfloat16],
                ids=["fp32", "fp16", "bf16"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def small_triton_blocks(monkeypatch):
    """Makes the Triton row kernels loop over 256-wide blocks, so that the multi-block path
    (with a partial last block) runs on small shapes."""
    import lmfast.kernels._common as common

    monkeypatch.setattr(common, "MAX_BLOCK_N", 256)


@pytest.fixture
def set_backend_env():
    """set_backend_env(value): sets LMFAST_BACKEND for the test (None: unset) and makes lmfast
    read it again (it reads the environment once, at first use); restored afterwards."""
    from lmfast import _backends

    old = os.environ.get("LMFAST_BACKEND")

    def set_env(value):
        if value is None:
            os.environ.pop("LMFAST_BACKEND", None)
        else:
            os.environ["LMFAST_BACKEND"] = value
        _backends.refresh()

    yield set_env
    set_env(old)


@pytest.fixture
def tests_in_fresh_process(tmp_path):
    """tests_in_fresh_process(files, keyword, **env): runs pytest on `files` (-k `keyword`) in a
    new process with `env` added to the environment, and returns its summary line after
    asserting that it passed. The process starts outside the checkout: `python -m` puts the
    working directory first on sys.path, and the source folder's lmfast (no compiled
    libraries) would shadow the installed one."""
    import subprocess
    import sys

    def run(files, keyword: str, **env) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-k", keyword,
             *map(str, files)],
            cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
        summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        assert out.returncode == 0 and " passed" in summary, \
            f"{env}: {summary}\n{out.stdout[-4000:]}{out.stderr[-2000:]}"
        return summary
    return run


@pytest.fixture(autouse=True)
def _seed():
    # LMFAST_TEST_SEED reruns the suite on other random inputs (e.g. to hunt rare failures).
    torch.manual_seed(int(os.environ.get("LMFAST_TEST_SEED", "0")))


# The README's test command runs pytest-xdist with --dist loadfile: each file goes whole to one
# worker, handed out in collection order (pytest_configure). The longest files go first, so that
# no worker is still starting one of them when the others run out of work. (Serial runs just see
# a new order.)
# Ordered by each file's time in a run of the README's test command on 2 cores with the
# compile caches a new machine has cold (2026-12-08, `--durations=0` summed per file; the files
# after the CUDA kernels' split from ATen and the GGUF conversion's single parse, by estimate):
# test_attention_kernels.py 330 s, test_isa_levels.py 160 (the CPU parity tests again under
# each other ISA level), test_patch.py 110 (SmolLM2), test_cuda_emulation.py 95, test_cli.py
# 90, test_triton_compile.py 90, test_backends.py 85 (a first-use build), test_cuda_build.py 60
# (nvcc), ... test_bad_inputs.py 12; the files after it took under 10 s each.
LONGEST_FILES_FIRST = ("test_attention_kernels.py", "test_isa_levels.py", "test_patch.py", "test_cuda_emulation.py",
                       "test_cli.py", "test_triton_compile.py", "test_backends.py", "test_cuda_build.py",
                       "test_reliability.py", "test_norm.py", "test_benchmark_suite.py", "test_softmax.py",
                       "test_patch_models.py", "test_compile.py", "test_distributed.py", "test_fuzz.py",
                       "test_bad_inputs.py")


def pytest_configure(config):
    # pytest-xdist 3.x hands out loadfile's files by their number of tests, most first, unless
    # told not to: the slowest files (test_triton_compile.py, 1 test; test_isa_levels.py, 9)
    # then went last, and one worker ran them for minutes after the other had finished.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="session")
def cuda_emulation():
    """tests/cuda_emulation.py: build() and install() of the CUDA kernels' host emulation."""
    return _load_cuda_emulation()
