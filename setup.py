"""Builds lmfast._C and the per-ISA kernel libraries lmfast._cpu_<level> from csrc/ when torch
is importable at build time (`pip install --no-build-isolation .`), and lmfast._cuda (the CUDA
kernels) when that torch is a CUDA build and nvcc is found. Otherwise installs the pure-Python
package, and the C++ kernels are compiled on first use (lmfast/_extension.py) against the
torch that is running. One line says what is built.

torch is deliberately not a build requirement: an isolated build would install a second torch
whose ABI may not match the user's. No downloads, no git calls.

Environment switches:
  LMFAST_SKIP_CPU_BUILD=1   do not build lmfast._C ahead of time (it is built on first use)
  LMFAST_SKIP_CUDA_BUILD=1  do not build lmfast._cuda (the CUDA backend is then unavailable)
  LMFAST_CPU_ARCH           one kernel library for one -march instead of one per ISA level
                            (see lmfast/_build_flags.py)
  LMFAST_CUDA_ARCHS         GPU architectures of lmfast._cuda (default "80;90")
  MAX_JOBS                  parallel compile jobs (read by torch's BuildExtension); default:
                            from this machine's cores and memory
"""

import os
import runpy

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
flags = runpy.run_path(os.path.join(HERE, "lmfast", "_build_flags.py"))


def cpu_extensions():
    """lmfast._C (registrations, baseline ISA) and one lmfast._cpu_<level> kernel library per ISA
    level (lmfast/_build_flags.py), with the build_ext command that builds them."""
    if os.environ.get("LMFAST_SKIP_CPU_BUILD") == "1":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("lmfast: torch is not importable at build time; the C++ kernels will be "
              "compiled on first use (pip install --no-build-isolation . builds them now)")
        return None

    def extension(name, sources, args):
        return CppExtension(name, sources=[os.path.join("csrc", s) for s in sources],
                            extra_compile_args=args, extra_link_args=flags["CPU_LINK_ARGS"])

    exts = [extension("lmfast._C", flags["CORE_SOURCES"], flags["core_compile_args"](torch.__version__))]
    levels = list(flags["kernel_levels"]())
    for level in levels:
        exts.append(extension(f"lmfast.{flags['kernel_module'](level)}", flags["KERNEL_SOURCES"],
                              flags["kernel_compile_args"](torch.__version__, level)))
    cuda, cuda_note = cuda_extension(torch)
    if cuda is not None:
        exts.append(cuda)
    print(f"lmfast: building the C++ kernels: CPU ({', '.join(levels)}) + {cuda_note}", flush=True)

    class BuildEachInItsOwnFolder(BuildExtension):
        # The kernel libraries compile the same sources with different flags: each extension
        # gets its own object folder, or one level's objects would overwrite another's.
        def build_extension(self, ext):
            shared = self.build_temp
            self.build_temp = os.path.join(shared, ext.name)
            try:
                super().build_extension(ext)
            except Exception as e:
                if ext.name != "lmfast._cuda":
                    raise
                self._note_cuda_build(ext, e)
            else:
                if ext.name == "lmfast._cuda":
                    self._note_cuda_build(ext, None)
            finally:
                self.build_temp = shared

        def _note_cuda_build(self, ext, error):
            """The CUDA backend is opt-in (Triton serves CUDA tensors by default): a compile
            error there must not cost the user the CPU kernels. lmfast installs without
            lmfast._cuda and keeps the reason beside it, which `lmfast info` reports (and which
            stops the first-use build from retrying it in every process). error None: built,
            so an earlier build's note goes."""
            note = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), flags["CUDA_BUILD_ERROR_FILE"])
            if error is None:
                if os.path.exists(note):
                    os.remove(note)
                return
            why = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            os.makedirs(os.path.dirname(note), exist_ok=True)
            with open(note, "w") as f:
                f.write(f"{why} (the compiler's errors are in the install log)\n")
            print(f"lmfast: the CUDA kernels did not compile ({why}); installing without them: the CPU and "
                  "Triton backends are unaffected, `lmfast info` says why backend 'cuda' is missing", flush=True)

    return exts, BuildEachInItsOwnFolder.with_options(use_ninja=True)


def cuda_extension(torch):
    """(lmfast._cuda's Extension or None, what the build line says about CUDA)."""
    if os.environ.get("LMFAST_SKIP_CUDA_BUILD") == "1":
        return None, "no CUDA (LMFAST_SKIP_CUDA_BUILD=1)"
    if torch.version.cuda is None:
        return None, f"no CUDA (torch {torch.__version__} is not a CUDA build)"
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import CUDAExtension

    # torch's guess of the toolkit, corrected where it holds no CUDA headers (a wrapper nvcc on
    # PATH: _build_flags.cuda_home); set on the module, whose build helpers read it as they compile
    cuda_home = cpp_extension.CUDA_HOME = flags["cuda_home"](cpp_extension.CUDA_HOME)
    if cuda_home is None:
        return None, (f"no CUDA (no nvcc found: install the CUDA {torch.version.cuda} toolkit, or set "
                      "CUDA_HOME, to build the CUDA kernels)")
    nvcc_version = _nvcc_version(os.path.join(cuda_home, "bin", "nvcc"))
    if nvcc_version and nvcc_version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, (f"no CUDA (nvcc {nvcc_version} does not match torch's CUDA {torch.version.cuda}: "
                      f"install the CUDA {torch.version.cuda.split('.')[0]}.x toolkit, or a torch built for "
                      f"CUDA {nvcc_version.split('.')[0]})")
    archs = flags["cuda_archs"]()
    ext = CUDAExtension("lmfast._cuda", sources=[os.path.join("csrc", s) for s in flags["CUDA_SOURCES"]],
                        extra_compile_args=flags["cuda_compile_args"](torch.__version__, archs))
    return ext, f"CUDA {nvcc_version or torch.version.cuda} (sm_{', sm_'.join(archs)})"


def _nvcc_version(nvcc: str) -> str | None:
    """"13.0" from `nvcc --version`, or None if it does not run."""
    import re
    import subprocess

    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def license_metadata() -> dict:
    """The license, in the form this setuptools reads (pyproject.toml lists it as dynamic)."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) >= 77:
        return {"license_expression": "BSD-3-Clause", "license_files": ["LICENSE"]}
    return {"license": "BSD-3-Clause"}  # older releases: free text; LICENSE found by its name


os.environ.setdefault("MAX_JOBS", str(flags["default_max_jobs"]()))
built = cpu_extensions()
setup(
    **license_metadata(),
    ext_modules=built[0] if built else [],
    cmdclass={"build_ext": built[1]} if built else {},
)
