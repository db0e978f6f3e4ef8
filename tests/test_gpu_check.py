"""scripts/gpu_check.sh, run here with stand-ins for the GPU machine's commands (python3,
nvidia-smi, nvcc, nproc, compute-sanitizer) that record how they were called: its steps, their
order and arguments, the budget that skips steps, and a step stopped at its limit, which must
still show pytest's failures. The script runs for real only on a GPU, in minutes that are
scarce; a mistake in it would be found there, so it is checked here."""

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

# python3 as the GPU machine has it, without the GPU: every call is logged; the imports the
# script probes answer as on a machine with pytest-xdist and transformers but not the
# pretrained-model packages; pytest passes at once, or (STUB_PYTEST_HANGS) runs until
# interrupted and then prints a failure and its summary line, as pytest does on Ctrl-C.
PYTHON3 = r"""#!/usr/bin/env bash
echo "python3 $*" >> "$STUB_LOG"
case "$*" in
  *"import xdist"*) exit 0 ;;
  *"import transformers, gguf"*) exit 1 ;;
  *"import transformers"*) exit 0 ;;
  *get_device_capability*) echo 90 ;;
  "-m lmfast.cli info"*) echo "  cuda    yes  (stand-in)" ;;
  "-m pytest"*)
    if [ -n "${STUB_PYTEST_HANGS:-}" ]; then
      sleep 60 &
      trap 'kill $! 2>/dev/null; echo "FAILED tests/test_stub.py::test_one - boom"; echo "1 failed, 2 passed in 2.00s"; exit 2' INT
      echo "..F"
      wait $!
    fi
    echo "3 passed in 0.10s" ;;
esac
exit 0
"""
LOGGED = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
"""


def _tools(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", PYTHON3), ("nvidia-smi", LOGGED), ("nvcc", LOGGED), ("compute-sanitizer", LOGGED),
                       ("nproc", "#!/usr/bin/env bash\necho 16\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def run_gpu_check(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = _tools(tmp_path)
    log = tmp_path / "calls.log"
    out = tmp_path / "out"
    outer = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "LMFAST_CUDA_ARCHS"}
    full_env = {**outer, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log), **env}
    done = subprocess.run(["bash", str(SCRIPT), *args, str(out)], capture_output=True, text=True, timeout=120,
                          env=full_env)
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls


needs_timeout = pytest.mark.skipif(shutil.which("timeout") is None, reason="gpu_check.sh needs coreutils' timeout")


@needs_timeout
def test_the_default_run_installs_tests_then_benchmarks(tmp_path):
    done, calls = run_gpu_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().splitlines()[-1].startswith("gpu_check: done after"), done.stdout
    steps = [c for c in calls if c.startswith(("python3 -m pip", "python3 -m pytest", "python3 -m lmfast.cli bench",
                                               "python3 -m lmfast.triton_warmup", "python3 -m lmfast.decode_benchmark",
                                               "python3 -m lmfast.model_benchmarks"))]
    assert [s.split()[2] for s in steps] == ["pip", "pytest", "lmfast.triton_warmup", "lmfast.cli", "lmfast.cli",
                                              "lmfast.decode_benchmark", "lmfast.cli"], steps
    install, tests, _, attention, norms, _, gpt2 = steps
    assert "--no-build-isolation --no-deps --no-index" in install and install.endswith("-e .")
    # a worker a core but two (16 cores: 14), tests handed out one by one (--dist load)
    assert " -n 14 --dist load " in tests and "--dist loadfile" not in tests, tests
    for left_out in ("tests/test_triton_compile.py", "tests/test_cuda_emulation.py", "tests/test_isa_levels.py",
                     "tests/test_patch.py"):  # (test_patch.py: the model packages are missing here)
        assert f"--ignore={left_out}" in tests, tests
    assert "--ops attention" in attention and "--size full" in attention
    assert "--ops overhead layer_norm rms_norm softmax" in norms
    assert "--ops gpt2" in gpt2
    assert "real-model tests skipped: packages missing" in (tmp_path / "out" / "tests.log").read_text()


@needs_timeout
def test_a_step_stopped_at_its_limit_still_shows_pytests_failures(tmp_path):
    done, calls = run_gpu_check(tmp_path, GPU_CHECK_STEPS="tests", GPU_CHECK_STEP_LIMIT_S="2", STUB_PYTEST_HANGS="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stopped at its 2s limit" in done.stdout, done.stdout
    # the summary pytest printed when interrupted (SIGINT), not only the last lines of the log
    assert "FAILED tests/test_stub.py::test_one - boom" in done.stdout, done.stdout
    assert "1 failed, 2 passed in 2.00s" in done.stdout, done.stdout
    assert not any(c.startswith("python3 -m lmfast.cli bench") for c in calls)


@needs_timeout
def test_steps_the_budget_no_longer_fits_are_skipped_and_said(tmp_path):
    done, calls = run_gpu_check(tmp_path, GPU_CHECK_BUDGET_S="80")  # ~75 s left for each step here
    assert done.returncode == 0, done.stdout + done.stderr
    left = r"skipped, 7\ds of the 80s budget left"
    assert re.search(rf"== install \(CUDA archs 90\): {left} \(it needs 120s\)", done.stdout), done.stdout
    assert re.search(rf"-n 14 --dist load\): {left} \(it needs 90s\)", done.stdout), done.stdout
    assert re.search(r"== benchmarks \(GPU sizes\): attention \(limit 7\ds\)", done.stdout), done.stdout  # needs 60 s
    assert not any(c.startswith(("python3 -m pip", "python3 -m pytest")) for c in calls), calls
    assert any(c.startswith("python3 -m lmfast.cli bench") for c in calls), calls


@needs_timeout
def test_sanitize_compiles_in_parallel_then_runs_the_same_tests_under_memcheck(tmp_path):
    done, calls = run_gpu_check(tmp_path, "--sanitize", GPU_CHECK_STEPS="")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [c for c in calls if "pytest" in c]
    assert len(runs) == 2, calls
    warmup, sanitized = runs
    selection = "tests/test_norm.py tests/test_softmax.py tests/test_attention_kernels.py -k cuda-cuda"
    assert warmup.startswith(f"python3 -m pytest {selection}") and "-n 14 --dist load" in warmup, warmup
    assert sanitized.startswith("compute-sanitizer --tool memcheck --error-exitcode 97"), sanitized
    assert f"python3 -m pytest {selection}" in sanitized and sanitized.endswith(" -x"), sanitized
    assert not any("lmfast.cli bench" in c for c in calls)


@needs_timeout
def test_a_call_without_install_installs_on_a_bare_machine(tmp_path):
    done, calls = run_gpu_check(tmp_path, GPU_CHECK_STEPS="tests")
    assert done.returncode == 0, done.stdout + done.stderr
    installed = any(c.startswith("python3 -m pip install") for c in calls)
    if any(ROOT.glob("lmfast/_C*.so")):  # this checkout has an in-place build: used as it is
        assert not installed and "installing first" not in done.stdout, done.stdout
    else:  # as on a machine handed back between two calls
        assert installed and "no in-place build of lmfast here (a bare machine): installing first" in done.stdout
    assert any(c.startswith("python3 -m pytest tests") for c in calls), calls


def test_triton_warmup_covers_every_flag_set_of_the_attention_benchmark():
    """lmfast.triton_warmup (gpu_check's step before the attention benchmark) compiles what the
    benchmark autotunes only if its shrunk cases hold every flag set and keep the integers a
    compiled kernel is specialized on: lengths that are multiples of 16, a document count that
    is neither 1 nor a multiple of 16."""
    from lmfast import benchmarking, triton_warmup

    full = benchmarking.cases("full", "cuda", ops=["attention"])
    warm = triton_warmup.warm_cases("cuda")
    assert {triton_warmup.flag_set(c) for c in warm} == {triton_warmup.flag_set(c) for c in full}
    assert len(warm) == len({triton_warmup.flag_set(c) for c in warm})  # one process each
    for case in [*full, *warm]:
        assert case.shape[2] % 16 == 0, case.name
        if case.documents:
            assert sum(case.documents) == case.shape[2] and len(case.documents) != 1, case.name
            assert len(case.documents) % 16 != 0, case.name
    assert all(c.shape[:1] + c.shape[2:3] == (1, triton_warmup.WARM_TOKENS) for c in warm)


def test_triton_warmup_runs_a_process_per_flag_set_and_reports_failures(monkeypatch, capsys):
    from lmfast import triton_warmup

    launched = []

    class FakeProcess:  # case 2 fails to compile
        def __init__(self, cmd, stdout, stderr):
            launched.append(cmd)
            self.returncode = 1 if cmd[-1] == "2" else 0
            if self.returncode:
                stderr.write("a compile error")

        def poll(self):
            return self.returncode

    monkeypatch.setattr(triton_warmup.subprocess, "Popen", FakeProcess)
    assert triton_warmup.main(["--workers", "3"]) == 1
    n = len(triton_warmup.warm_cases())
    assert sorted(int(c[-1]) for c in launched) == list(range(n))
    assert all(c[1:4] == ["-m", "lmfast.triton_warmup", "--case"] for c in launched)
    out = capsys.readouterr()
    assert f"triton_warmup: {n} flag sets, 1 failed" in out.out and "a compile error" in out.err


def test_triton_warmup_interrupted_leaves_no_compile_running(monkeypatch):
    """gpu_check interrupts a step at its limit: the compiles must not go on beside the
    benchmark that follows (they would time their tiles on the same GPU)."""
    from lmfast import triton_warmup

    procs = []

    class SlowProcess:
        def __init__(self, cmd, stdout, stderr):
            self.returncode, self.killed = None, False
            procs.append(self)

        def poll(self):
            return self.returncode

        def kill(self):
            self.killed, self.returncode = True, -9

        def wait(self):
            return self.returncode

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(triton_warmup.subprocess, "Popen", SlowProcess)
    monkeypatch.setattr(triton_warmup.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        triton_warmup.main(["--workers", "3"])
    assert len(procs) == 3 and all(p.killed for p in procs)
