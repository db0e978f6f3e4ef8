"""Compiler settings for lmfast._C, shared by setup.py (ahead-of-time build) and
lmfast._extension (first-use build). Imports nothing, so setup.py can exec it without
importing the package.

Environment switches:
  LMFAST_CPU_ARCH   value for -march (default "native": the build machine's best vector ISA;
                    use e.g. "x86-64-v3" for a wheel that must run on other AVX2 machines,
                    or "none" for no -march flag at all, the portable scalar build)
"""

import os

CPU_SOURCES = ("ops.cpp", "api.cpp", "cpu/norm.cpp", "cpu/softmax.cpp", "cpu/attention.cpp")


def cpu_compile_args(torch_version: str) -> list[str]:
    arch = os.environ.get("LMFAST_CPU_ARCH", "native")
    # -fno-wrapv undoes the -fwrapv that setup.py builds inherit from Python's CFLAGS (it
    # blocks some loop optimizations), so both builds compile the same code. The version is
    # unquoted (ops.cpp stringifies it): quotes would not survive the first-use ninja build.
    # No -std: torch's build helpers pass the standard its headers need (C++20 for 2.13).
    args = ["-O3", "-fno-wrapv", "-fopenmp", f"-DLMFAST_TORCH_VERSION={torch_version}"]
    if arch != "none":
        args.append(f"-march={arch}")
    return args


# -fopenmp links libgomp.so.1; torch's wheel ships its own libgomp.so.1, already loaded when
# the extension is, so the loader reuses it and torch and lmfast share one thread pool.
CPU_LINK_ARGS = ["-fopenmp"]
