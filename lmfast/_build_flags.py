"""Compiler settings for lmfast's C++ code, shared by setup.py (ahead-of-time build) and
lmfast._extension (first-use build). Imports nothing heavy, so setup.py can exec it without
importing the package.

Two kinds of library are built:
  lmfast._C            the op registrations, argument checks and autograd (CORE_SOURCES),
                       compiled for the baseline ISA: it loads on any CPU of the platform;
  lmfast._cpu_<level>  the kernels (KERNEL_SOURCES), once per ISA level with that level's
                       -march, so one build runs at full speed on every x86 CPU: at load,
                       lmfast._extension picks the best level the CPU runs (LMFAST_CPU_ISA
                       forces one) and _C forwards the kernel ops to it.

A third, lmfast._cuda (CUDA_SOURCES), holds the CUDA kernels of the same kernel ops,
registered for the CUDA dispatch key; it is built where nvcc and a CUDA build of torch are
present (setup.py, or on first use on a GPU machine).

Environment switches:
  LMFAST_CPU_ARCH   unset (default): the levels below. Set, one kernel library only, "custom",
                    compiled with -march=<value> (e.g. "native": the build machine's best ISA,
                    tied to CPUs like it), or with no -march at all for "none".
  LMFAST_CUDA_ARCHS the GPU architectures lmfast._cuda is compiled for, as compute
                    capabilities without the dot, ";"- or ","-separated (default "80;90": A100,
                    H100/H200); the highest also gets PTX, which newer GPUs compile at load.
"""

import os
import platform

CORE_SOURCES = ("ops.cpp", "api.cpp", "dispatch.cpp")
KERNEL_SOURCES = ("cpu/norm.cpp", "cpu/softmax.cpp", "cpu/attention.cpp", "cpu/kernel_table.cpp")

# ISA level -> its -march flags, best first. x86-64-v4 is AVX-512 F/BW/CD/DQ/VL (ATen's AVX512
# vectors); avx512bf16 adds AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake and Sapphire Rapids+),
# whose one-instruction float -> bfloat16 conversion the kernels use (csrc/cpu/vec.h,
# from_float); x86-64-v3 is AVX2 + FMA + F16C (ATen's AVX2 vectors); "default" is the
# compiler's baseline (SSE2 on x86-64), scalar ATen vectors.
X86_LEVELS = {"avx512bf16": ["-march=x86-64-v4", "-mavx512bf16"], "avx512": ["-march=x86-64-v4"],
              "avx2": ["-march=x86-64-v3"], "default": []}


def kernel_levels() -> dict[str, list[str]]:
    """The kernel libraries to build: level name -> its ISA flags."""
    arch = os.environ.get("LMFAST_CPU_ARCH")
    if arch:
        return {"custom": [] if arch == "none" else [f"-march={arch}"]}
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return dict(X86_LEVELS)
    return {"default": []}


# LMFAST_SANITIZE=1 (scripts/sanitize_cpu.sh): AddressSanitizer and UndefinedBehaviorSanitizer
# in every C++ library, which then load only with libasan preloaded.
SANITIZE_ARGS = (["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
                 if os.environ.get("LMFAST_SANITIZE") == "1" else [])


def _common_args(torch_version: str) -> list[str]:
    # -fno-wrapv undoes the -fwrapv that setup.py builds inherit from Python's CFLAGS (it
    # blocks some loop optimizations), so both builds compile the same code. The version is
    # unquoted (ops.cpp stringifies it): quotes would not survive the first-use ninja build.
    # No -std: torch's build helpers pass the standard its headers need (C++20 for 2.13).
    # -g0 undoes CFLAGS' -g too (the first-use build has none): debug info of the kernels'
    # templates cost 40% of the install's compile time and made the objects 17x larger
    # (LMFAST_SANITIZE=1 adds it back).
    return ["-O3", "-fno-wrapv", "-g0", "-fopenmp", f"-DLMFAST_TORCH_VERSION={torch_version}", *SANITIZE_ARGS]


def core_compile_args(torch_version: str) -> list[str]:
    return _common_args(torch_version)


def kernel_compile_args(torch_version: str, level: str) -> list[str]:
    # Hidden visibility: every inline function a kernel library instantiates (std::vector's,
    # ATen's) stays its own, so an AVX-512 copy can never be bound in place of another
    # library's. Only the kernel table is exported (csrc/cpu/kernel_table.cpp).
    return (_common_args(torch_version) + kernel_levels()[level]
            + ["-fvisibility=hidden", "-fvisibility-inlines-hidden", f"-DLMFAST_ISA_LEVEL={level}"])


def kernel_module(level: str) -> str:
    """The module name of a level's kernel library, inside the lmfast package."""
    return f"_cpu_{level}"


# (the .cu files hold the kernels and include no ATen header; ops.cpp does the tensor work:
# csrc/cuda/kernels.h)
CUDA_SOURCES = ("cuda/register.cpp", "cuda/ops.cpp", "cuda/norm.cu", "cuda/softmax.cu", "cuda/attention.cu")
# Left beside the package by an install whose CUDA compile failed (setup.py), with the reason
CUDA_BUILD_ERROR_FILE = "_cuda_build_error.txt"
DEFAULT_CUDA_ARCHS = "80;90"


def cuda_archs() -> list[str]:
    """The compute capabilities to compile for, e.g. ["80", "90"] (LMFAST_CUDA_ARCHS)."""
    raw = os.environ.get("LMFAST_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    bad = [a for a in archs if not a.isdigit() or not 2 <= len(a) <= 3]
    if bad or not archs:
        raise ValueError(f"LMFAST_CUDA_ARCHS={raw!r}: expected compute capabilities such as '80;90'")
    return sorted(set(archs), key=int)


def nvcc_arch_flags(archs: list[str]) -> list[str]:
    """-gencode flags: machine code for each arch, and PTX of the highest."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def cuda_compile_args(torch_version: str, archs: list[str]) -> dict[str, list[str]]:
    """extra_compile_args of lmfast._cuda: host compiler ("cxx") and nvcc flags. The arch flags
    also stop torch's build helpers from adding their own (TORCH_CUDA_ARCH_LIST)."""
    defines = [f"-DLMFAST_TORCH_VERSION={torch_version}", f"-DLMFAST_CUDA_ARCHS={'_'.join(archs)}"]
    return {"cxx": ["-O3", "-fno-wrapv", "-g0"] + defines,  # (as _common_args)
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines + nvcc_arch_flags(archs)}


def cuda_home(found: str | None) -> str | None:
    """The CUDA toolkit to compile lmfast._cuda with, given torch's guess (its cpp_extension's
    CUDA_HOME). torch takes CUDA_HOME from the environment, else the folder above the `nvcc` on
    PATH: where that nvcc is a wrapper script (/usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc, as on this project's build machines) that folder is
    /usr/local, without CUDA's headers, and the host files that include cuda_runtime.h did not
    compile. So where the guess has no include/cuda_runtime.h, nvcc is asked where it runs from
    (`nvcc --dryrun` prints TOP=<toolkit>/bin/..); the guess stands if that finds nothing better."""
    import re
    import subprocess

    def has_headers(root: str) -> bool:
        return os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))

    if found is None or has_headers(found):
        return found
    try:
        out = subprocess.run([os.path.join(found, "bin", "nvcc"), "--dryrun", "-c", "-x", "cu", os.devnull,
                              "-o", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return found
    top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if top is not None and has_headers(os.path.realpath(top.group(1).strip())):
        return os.path.realpath(top.group(1).strip())
    return found


def default_max_jobs() -> int:
    """Parallel compile jobs for this machine: one per core, at most one per 3 GiB of memory
    (nvcc on the kernel files takes 1-2 GiB each)."""
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, int(mem_gib // 3)))


# -fopenmp links libgomp.so.1; torch's wheel ships its own libgomp.so.1, already loaded when
# the extension is, so the loader reuses it and torch and lmfast share one thread pool.
CPU_LINK_ARGS = ["-fopenmp", *SANITIZE_ARGS]
