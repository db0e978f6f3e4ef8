"""Builds the host emulation of the CUDA kernels (csrc/cuda/emulation) for the tests, and puts
it behind lmfast's public C++ ops.

build()    torch.ops.lmfast_cuda_emulation, built once per source hash into
           build/cuda-emulation-<hash> (~15 s; LMFAST_CUDA_EMULATION_SANITIZE=1: with ASan +
           UBSan, for scripts/sanitize_cpu.sh, which preloads their runtimes).
install()  registers the emulated kernels as lmfast_C's kernel ops for the CPU key, in this
           process: lmfast.ops on CPU tensors (backend "cpu") then run api.cpp's checks,
           autograd and glue exactly as backend "cuda" does on a GPU, around the CUDA kernels.
           conftest.py does this for a whole run under LMFAST_TEST_CPU_KERNELS=cuda-emulation
           (test_cuda_emulation.py runs the fuzz that way). attention_bwd keeps the CPU kernel:
           on CUDA the backward is Triton's, not a CUDA C++ kernel.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMULATION_DIR = CUDA_DIR / "emulation"
KERNEL_OPS = ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd", "softmax_fwd", "softmax_bwd",
              "attention_fwd")


def build():
    """torch.ops.lmfast_cuda_emulation, built from the current sources (or loaded if built)."""
    from torch.utils import cpp_extension

    # (and csrc's headers: documents.h, dropout_hash.h and others are compiled in too)
    shared_headers = [p for p in CUDA_DIR.parent.iterdir() if p.suffix == ".h"]
    sources = sorted(p for p in [*shared_headers, *CUDA_DIR.iterdir(), *EMULATION_DIR.rglob("*")]
                     if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    # Under the sanitizers an out-of-bounds access of a kernel to a tensor, which the emulator
    # itself cannot see, fails the launch, as compute-sanitizer's memcheck would on a GPU.
    sanitize = os.environ.get("LMFAST_CUDA_EMULATION_SANITIZE") == "1"
    sanitizer_flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                       "-fno-omit-frame-pointer"] if sanitize else []
    build_dir = ROOT / "build" / f"cuda-emulation-{digest}{'-sanitized' if sanitize else ''}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="lmfast_cuda_emulation",
        sources=[str(EMULATION_DIR / f"{n}.cpp")
                 for n in ("emulator", "norm", "softmax", "attention", "ops", "register", "selftest")],
        extra_include_paths=[str(EMULATION_DIR / "include")],
        extra_cflags=["-O2", "-std=c++20", "-DLMFAST_CUDA_EMULATION", "-Wno-unknown-pragmas", *sanitizer_flags],
        extra_ldflags=sanitizer_flags, build_directory=str(build_dir), is_python_module=False)
    return torch.ops.lmfast_cuda_emulation


_installed: list = []  # the torch.library.Library holding the override (kept alive)


def install() -> None:
    """The emulated CUDA kernels become lmfast_C's CPU kernel ops for the rest of this process."""
    if _installed:
        return
    import warnings

    from lmfast import _extension

    status = _extension.status()  # loads lmfast_C, whose CPU registrations this overrides
    assert status.loaded, f"lmfast's C++ extension did not load: {status}"
    emu = build()
    lib = torch.library.Library("lmfast_C", "IMPL")
    with warnings.catch_warnings():  # (torch also warns once from C++: "Overriding a previously registered kernel")
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for name in KERNEL_OPS:
            lib.impl(name, getattr(emu, name), "CPU")
    _installed.append(lib)
    # the override is in effect: float64, which only the CPU kernels take, is now refused
    try:
        torch.ops.lmfast_C.softmax_fwd(torch.zeros(1, 1, 1, 2, dtype=torch.float64), None, 1.0, False)
    except (TypeError, RuntimeError):
        return
    raise AssertionError("the emulated CUDA kernels did not replace lmfast_C's CPU kernels")
