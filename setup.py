"""Builds lmfast._C and the per-ISA kernel libraries lmfast._cpu_<level> from csrc/ when torch
is importable at build time (`pip install --no-build-isolation .`). Otherwise installs the pure-Python package, and the C++
kernels are compiled on first use (lmfast/_extension.py) against the torch that is running.

torch is deliberately not a build requirement: an isolated build would install a second torch
whose ABI may not match the user's. No downloads, no git calls.

Environment switches:
  LMFAST_SKIP_CPU_BUILD=1   do not build lmfast._C ahead of time (it is built on first use)
  LMFAST_CPU_ARCH           one kernel library for one -march instead of one per ISA level
                            (see lmfast/_build_flags.py)
  MAX_JOBS                  parallel compile jobs (read by torch's BuildExtension)
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
    for level in flags["kernel_levels"]():
        exts.append(extension(f"lmfast.{flags['kernel_module'](level)}", flags["KERNEL_SOURCES"],
                              flags["kernel_compile_args"](torch.__version__, level)))

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


built = cpu_extensions()
setup(
    ext_modules=built[0] if built else [],
    cmdclass={"build_ext": built[1]} if built else {},
)
