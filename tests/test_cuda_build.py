"""The CUDA backend where no GPU is: every CUDA source compiles for sm_80 and sm_90 with this
machine's nvcc, with the flags of the real build (lmfast/_build_flags.py), and without register
spills; the build switches parse; and lmfast says why the backend cannot run here.

Nothing built here runs here: the kernels are checked on a GPU by scripts/gpu_check.sh. The
CPU build of torch ships ATen's and c10's CUDA headers but not one generated config header
(c10/cuda/impl/cuda_cmake_macros.h), which the compile check supplies as the CUDA build of
torch generates it.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import lmfast
from lmfast import _backends

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
FLAGS = runpy.run_path(str(ROOT / "lmfast" / "_build_flags.py"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate and candidate.exists() else None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: the CUDA sources are compile-checked "
                                                     "only where it is (it is on the CI machines)")


def test_every_cuda_source_is_in_the_build():
    on_disk = {f"cuda/{f.name}" for f in CUDA_DIR.iterdir() if f.suffix in (".cu", ".cpp")}
    on_disk.discard("cuda/row_math_host.cpp")  # the host test library (test_cuda_math.py)
    assert set(FLAGS["CUDA_SOURCES"]) == on_disk


def _includes(path: Path) -> list[tuple[str, bool]]:
    """(name, quoted) of each #include of a file, outside its LMFAST_CUDA_EMULATION branches
    (the emulation's headers are the host build's only)."""
    out = []
    branches = []  # per open #if: (whether it tests LMFAST_CUDA_EMULATION, whether its branch is the emulation's)
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#if"):
            tests_emulation = "LMFAST_CUDA_EMULATION" in s
            branches.append((tests_emulation, tests_emulation and not s.startswith("#ifndef") and "!" not in s))
        elif s.startswith("#else") and branches:
            tests_emulation, emulation = branches.pop()
            branches.append((tests_emulation, tests_emulation and not emulation))
        elif s.startswith("#endif") and branches:
            branches.pop()
        elif not any(emulation for _, emulation in branches) and (m := re.match(r'#include\s*([<"])([^>"]+)[>"]', s)):
            out.append((m.group(2), m.group(1) == '"'))
    return out


def test_cuda_kernel_files_include_no_aten_header():
    """kernels.h: the .cu files reach ATen, c10 and torch through no include, followed through
    our own headers, so nvcc's host pass and one device pass per architecture each skip ATen's
    headers (~30 s a file on a 2-core CPU, in the build and in the compile check above);
    ops.cpp does the tensor work."""
    seen, todo, found = set(), sorted(CUDA_DIR.glob("*.cu")), []
    assert todo
    while todo:
        path = todo.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        for name, quoted in _includes(path):
            if name.split("/")[0] in ("ATen", "c10", "torch") or name == "Python.h":
                found.append(f"{path.relative_to(ROOT)}: #include {name}")
            elif quoted:
                todo.append(path.parent / name)
    assert not found, "\n".join(found)
    assert ROOT / "csrc" / "documents.h" in seen and CUDA_DIR / "kernels.h" in seen  # (the walk follows includes)


@pytest.fixture(scope="module")
def include_flags(tmp_path_factory) -> list[str]:
    from torch.utils import cpp_extension

    dirs = list(cpp_extension.include_paths())
    macros = Path(dirs[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not macros.exists():  # CPU wheel: the header the CUDA build generates, as it generates it
        shim = tmp_path_factory.mktemp("cuda_shim")
        (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
        (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.insert(0, str(shim))
    dirs.append(sysconfig.get_paths()["include"])  # Python.h (register.cpp)
    return [f"-I{d}" for d in dirs]


MAX_SPILL_BYTES = 64


@needs_nvcc
def test_cuda_sources_compile_for_sm80_and_sm90_without_spills(include_flags, tmp_path):
    args = FLAGS["cuda_compile_args"](torch.__version__, ["80", "90"])
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"

    def compile_one(source: str) -> tuple[str, subprocess.CompletedProcess]:
        path = ROOT / "csrc" / source
        if path.suffix == ".cu":
            cmd = [NVCC, "-c", str(path), "-o", str(tmp_path / (path.name + ".o")), "-std=c++20", "-Xcompiler", "-fPIC",
                   abi, *include_flags, *args["nvcc"], "-Xptxas", "-warn-spills"]
        else:  # host code: nvcc hands it to the host compiler with CUDA's include path
            cmd = [NVCC, "-c", str(path), "-o", str(tmp_path / (path.name + ".o")), "-std=c++20", "-Xcompiler",
                   "-fPIC", abi, *include_flags, *(f"-Xcompiler={a}" for a in args["cxx"])]
        return source, subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, FLAGS["CUDA_SOURCES"]))
    for source, out in results:
        log = out.stdout + out.stderr
        assert out.returncode == 0, f"{source} does not compile:\n{log[-6000:]}"
        # (nvcc notes that sm_80/sm_90 offline compilation is deprecated in some versions: not ours)
        # A few bytes spilled (a loop-invariant value) cost nothing; a register-pressure change
        # that spills a tile's worth does. (The prefill kernels spill 4-28 bytes on sm_90.)
        spills = [line for line in log.splitlines() if "spilled" in line
                  and int(re.search(r"(\d+) bytes spill stores", line).group(1)) > MAX_SPILL_BYTES]
        assert not spills, f"{source}: register spills past {MAX_SPILL_BYTES} bytes:\n" + "\n".join(spills[:20])


def test_cuda_arch_switch(monkeypatch):
    monkeypatch.delenv("LMFAST_CUDA_ARCHS", raising=False)
    assert FLAGS["cuda_archs"]() == ["80", "90"]
    monkeypatch.setenv("LMFAST_CUDA_ARCHS", "9.0, 8.6;80")
    assert FLAGS["cuda_archs"]() == ["80", "86", "90"]
    assert FLAGS["nvcc_arch_flags"](["80", "90"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.setenv("LMFAST_CUDA_ARCHS", "hopper")
    with pytest.raises(ValueError, match="LMFAST_CUDA_ARCHS='hopper'"):
        FLAGS["cuda_archs"]()


def test_max_jobs_default_is_positive_and_bounded_by_cores():
    jobs = FLAGS["default_max_jobs"]()
    assert 1 <= jobs <= (os.cpu_count() or 1)


def test_cuda_backend_loads_on_a_gpu_machine_and_says_why_not_elsewhere():
    st = lmfast.backends()["cuda"]
    if torch.cuda.is_available() and os.environ.get("LMFAST_SKIP_CUDA_BUILD") != "1":
        # a CUDA torch with a GPU and no working lmfast._cuda is a broken install
        assert st.available, st.detail
        return
    assert not st.available
    if torch.version.cuda is None:
        assert "CPU build" in st.detail
    elif not torch.cuda.is_available():
        assert "no CUDA device" in st.detail
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        lmfast.ops.rms_norm(torch.randn(2, 8), backend="cuda")


def test_cuda_backend_is_opt_in_until_a_gpu_result_justifies_it():
    # "auto" prefers the CUDA C++ kernels only on rows that cite a committed GPU result
    for (op, capability), (backend, evidence) in _backends.AUTO_ON_CUDA.items():
        assert op in _backends.KERNEL_OPS[backend], (op, backend)
        assert (ROOT / "benchmarks" / "results" / evidence).is_file(), f"{op} on sm {capability}: no {evidence}"


def test_setup_says_what_it_builds(tmp_path):
    # setup.py's one line about the build, as pip shows it (here: CPU levels, and why no CUDA)
    out = subprocess.run([sys.executable, str(ROOT / "setup.py"), "--name"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "LMFAST_SKIP_CPU_BUILD": "0"})
    line = next((x for x in out.stdout.splitlines() if x.startswith("lmfast: building the C++ kernels")), None)
    assert line is not None, out.stdout + out.stderr
    if torch.version.cuda is None:
        assert "no CUDA (torch" in line and "is not a CUDA build" in line


def test_cuda_home_is_the_toolkit_a_wrapper_nvcc_runs(tmp_path):
    """torch guesses CUDA_HOME as the folder above the nvcc on PATH; a wrapper script there
    (/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc, as on this project's build
    machines) made it /usr/local, without CUDA's headers, and lmfast._cuda's host file failed to
    compile. _build_flags.cuda_home asks nvcc where it runs from (`nvcc --dryrun`: TOP=...)."""
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper = tmp_path / "usr" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f"#!/bin/sh\necho '#$ _HERE_={toolkit}/bin' >&2\necho '#$ TOP={toolkit}/bin/..' >&2\n")
    wrapper.chmod(0o755)
    cuda_home = FLAGS["cuda_home"]
    assert cuda_home(str(tmp_path / "usr")) == str(toolkit)
    assert cuda_home(str(toolkit)) == str(toolkit)  # a guess with the headers stands
    assert cuda_home(None) is None
    assert cuda_home(str(tmp_path / "nowhere")) == str(tmp_path / "nowhere")  # no nvcc to ask: the guess stands


def test_a_cuda_compile_that_failed_at_install_is_reported_not_retried(monkeypatch, tmp_path):
    """setup.py installs without lmfast._cuda when its compile fails (the CPU and Triton
    backends must not be lost to the opt-in CUDA backend) and leaves the reason beside the
    package: lmfast info reports it, and no process retries the build on first use."""
    from lmfast import _extension

    note = tmp_path / FLAGS["CUDA_BUILD_ERROR_FILE"]
    note.write_text("RuntimeError: Error compiling objects for extension (the compiler's errors are in the log)\n")
    monkeypatch.setattr(_extension, "_cuda_build_error_file", lambda: note)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_extension, "_load_cuda_first_use", lambda: pytest.fail("the failed build was retried"))
    if importlib.util.find_spec("lmfast._cuda") is not None:
        pytest.skip("lmfast._cuda is installed here")
    st = _extension.cuda_status.__wrapped__()
    assert not st.loaded
    assert "did not compile when lmfast was installed" in st.detail and "Error compiling objects" in st.detail
    assert "reinstall" in st.detail
