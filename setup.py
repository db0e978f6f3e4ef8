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
            finally:
                self.build_temp = shared

    return exts, BuildEachInItsOwnFolder.with_options(use_ninja=True)


def cuda_extension(torch):
    """(lmfast._cuda's Extension or None, what the build line says about CUDA)."""
    if os.environ.get("LMFAST_SKIP_CUDA_BUILD") == "1":
        return None, "no CUDA (LMFAST_SKIP_CUDA_BUILD=1)"
    if torch.version.cuda is None:
        return None, f"no CUDA (torch {torch.__version__} is not a CUDA build)"
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if CUDA_HOME is None:
        return None, (f"no CUDA (no nvcc found: install the CUDA {torch.version.cuda} toolkit, or set "
                      "CUDA_HOME, to build the CUDA kernels)")
    nvcc_version = _nvcc_version(os.path.join(CUDA_HOME, "bin", "nvcc"))
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


os.environ.setdefault("MAX_JOBS", str(flags["default_max_jobs"]()))
built = cpu_extensions()
setup(
    ext_modules=built[0] if built else [],
    cmdclass={"build_ext": built[1]} if built else {},
)
