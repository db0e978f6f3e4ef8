"""The CPU kernels' ISA levels: one build holds a kernel library per level
(lmfast/_build_flags.py), the best one this CPU runs is loaded, LMFAST_CPU_ISA forces one, and
the kernels' parity tests pass under every level this machine can run."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lmfast import _build_flags, _extension

REPO = Path(__file__).resolve().parents[1]
# Child processes start outside the checkout: `python -c` and `python -m` put the working
# directory first on sys.path, and the source folder's lmfast (no compiled libraries) would
# shadow the installed one and build its kernels on first use instead.
OUTSIDE = tempfile.gettempdir()
LEVELS = list(_build_flags.kernel_levels())  # what this build was asked to hold
# The CPU backend's cases of the kernel test files (test ids name the backend: cpu-cpu, triton-cpu).
PARITY_FILES = ["tests/test_norm.py", "tests/test_softmax.py", "tests/test_attention.py",
                "tests/test_attention_kernels.py"]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=OUTSIDE, env={**os.environ, **env})


def _loaded() -> _extension.ExtensionStatus:
    status = _extension.status()
    assert status.loaded, status.detail
    return status


def test_every_level_of_the_platform_is_built():
    status = _loaded()  # first: cpu_levels() asks the loaded lmfast._C
    assert _extension.cpu_levels()[-1] == "default"
    if status.detail.startswith("lmfast._C, built at install time"):
        assert sorted(_extension._aot_kernel_libraries()) == sorted(LEVELS)


def test_the_best_level_the_cpu_runs_is_loaded():
    status = _loaded()
    forced = os.environ.get("LMFAST_CPU_ISA")
    runs = _extension.cpu_levels()
    expected = forced or ("custom" if LEVELS == ["custom"] else next(lv for lv in runs if lv in LEVELS))
    assert status.isa == expected, status.detail
    assert f"isa={expected};" in status.detail and status.kernels and Path(status.kernels).is_file()


def test_info_says_which_level_runs():
    out = subprocess.run([sys.executable, "-m", "lmfast.cli", "info"], capture_output=True, text=True,
                         timeout=300, cwd=OUTSIDE)
    assert out.returncode == 0, out.stderr
    assert f"kernels for {_loaded().isa}" in out.stdout


@pytest.mark.parametrize("value,message", [
    ("avx9", "LMFAST_CPU_ISA=avx9 is not a level"),
    ("avx512", None),  # runs where the CPU has AVX-512; else the error names what it runs
])
def test_a_forced_level_is_loaded_or_refused_with_the_reason(value, message):
    if LEVELS == ["custom"]:
        pytest.skip("an LMFAST_CPU_ARCH build holds one level only")
    code = ("import lmfast\nfrom lmfast import _extension\ns = _extension.status()\n"
            "print(s.loaded, s.isa)\nprint(s.detail)\n")
    out = _run(code, LMFAST_CPU_ISA=value)
    assert out.returncode == 0, out.stderr
    loaded, detail = out.stdout.splitlines()[:2]
    if message is None:
        can = value in _extension.cpu_levels()
        message = "kernels for avx512 (LMFAST_CPU_ISA)" if can else "LMFAST_CPU_ISA=avx512: this CPU runs only"
        assert loaded == ("True avx512" if can else "False None"), out.stdout
    assert message in detail, detail


@pytest.mark.parametrize("level", list(_build_flags.X86_LEVELS))
def test_kernel_parity_under_every_level(level, tests_in_fresh_process):
    """The CPU backend's parity tests (error budget, odd shapes, every dtype, gradients) in a
    fresh process that loads this level's kernels. The level this process loaded is covered
    by the whole suite; the others run here."""
    if level not in LEVELS:
        pytest.skip(f"this build does not hold the {level} kernels (built: {', '.join(LEVELS)})")
    if level not in _extension.cpu_levels():
        pytest.skip(f"this CPU cannot run {level} code (it runs {', '.join(_extension.cpu_levels())})")
    if level == _loaded().isa:
        pytest.skip(f"{level} is the level this process loaded: every other test runs it")
    # (not the torch.compile and opcheck tests: they check the ops' registrations, the same at every level)
    keyword = "cpu and not triton and not compile and not opcheck"
    if level == "avx512":
        # avx512bf16 is avx512 plus -mavx512bf16, which changes only the code under
        # __AVX512BF16__ (csrc/cpu/vec.h: rounding to bfloat16): the bfloat16 cases test what
        # differs; the rest would run the same machine code as the avx512bf16 level again
        keyword += " and (bf16 or bfloat16)"
    summary = tests_in_fresh_process([REPO / f for f in PARITY_FILES], keyword, LMFAST_CPU_ISA=level)
    assert "skipped" not in summary, summary
    probe = _run("from lmfast import _extension; print(_extension.status().isa)", LMFAST_CPU_ISA=level)
    assert probe.stdout.strip() == level, probe.stdout + probe.stderr
