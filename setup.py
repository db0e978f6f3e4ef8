"""Builds lmfast._C from csrc/ when torch is importable at build time
(`pip install --no-build-isolation .`). Otherwise installs the pure-Python package, and the C++
kernels are compiled on first use (lmfast/_extension.py) against the torch that is running.

torch is deliberately not a build requirement: an isolated build would install a second torch
whose ABI may not match the user's. No downloads, no git calls.

Environment switches:
  LMFAST_SKIP_CPU_BUILD=1   do not build lmfast._C ahead of time (it is built on first use)
  LMFAST_CPU_ARCH           see lmfast/_build_flags.py
  MAX_JOBS                  parallel compile jobs (read by torch's BuildExtension)
"""

import os
import runpy

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
flags = runpy.run_path(os.path.join(HERE, "lmfast", "_build_flags.py"))


def cpu_extension():
    if os.environ.get("LMFAST_SKIP_CPU_BUILD") == "1":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("lmfast: torch is not importable at build time; the C++ kernels will be "
              "compiled on first use (pip install --no-build-isolation . builds them now)")
        return None
    ext = CppExtension(
        "lmfast._C",
        sources=[os.path.join("csrc", s) for s in flags["CPU_SOURCES"]],
        extra_compile_args=flags["cpu_compile_args"](torch.__version__),
        extra_link_args=flags["CPU_LINK_ARGS"],
    )
    return ext, BuildExtension.with_options(use_ninja=True)


built = cpu_extension()
setup(
    ext_modules=[built[0]] if built else [],
    cmdclass={"build_ext": built[1]} if built else {},
)
