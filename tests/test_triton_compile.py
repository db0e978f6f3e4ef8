"""Every Triton kernel variant compiles ahead of time for NVIDIA Hopper (sm_90) and Ampere
(sm_80), on any machine, without a GPU.

The other tests run the Triton kernels through the interpreter, which executes them as Python
and so accepts code the real compiler rejects; this compiles them for real (to cubin, with
the ptxas that ships in the triton wheel). It runs in a subprocess because this test session
sets TRITON_INTERPRET=1, under which @triton.jit gives no compilable kernels.

Run as a script (python tests/test_triton_compile.py) it prints each variant it compiles.
"""

import itertools
import os
import subprocess
import sys

import pytest

DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _variants():
    """(kernel name, signature, constexprs) for every variant worth compiling."""
    out = []
    for dt, one_block, centered in itertools.product(DTYPES, (True, False), (True, False)):
        p = f"*{dt}"
        block = {"BLOCK_N": 1024 if one_block else 8192, "ONE_BLOCK": one_block, "INTERPRETED": False}
        for full in (True, False):  # every optional input present / absent
            out.append(("norm._norm_fwd_kernel",
                        {"X": p, "RES": p, "W": p, "B": p, "Y": p, "RES_OUT": p, "MEAN": "*fp32",
                         "RSTD": "*fp32", "N": "i32", "eps": "fp32"},
                        {"CENTERED": centered, "HAS_RES": full, "HAS_W": full, "HAS_B": full and centered, **block}))
            out.append(("norm._norm_bwd_kernel",
                        {"DY": p, "X": p, "W": p, "MEAN": "*fp32", "RSTD": "*fp32", "DRES": p, "DX": p,
                         "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "rows": "i32", "N": "i32",
                         "rows_per_program": "i32"},
                        {"CENTERED": centered, "HAS_W": full, "HAS_DRES": full, "W_GRAD": full,
                         "B_GRAD": full and centered, **block}))
        for mask in ("none", "bool", "additive"):
            if not centered:  # softmax has no `centered`: one pass over the loop suffices
                continue
            out.append(("softmax._softmax_fwd_kernel",
                        {"X": p, "Y": p, "MASK": "*u8" if mask == "bool" else p, "stride_mb": "i64",
                         "stride_mh": "i64", "stride_mm": "i64", "stride_mn": "i64", "H": "i32",
                         "M": "i32", "N": "i32", "scale": "fp32"},
                        {"HAS_MASK": mask != "none", "BOOL_MASK": mask == "bool", "CAUSAL": mask != "additive", **block}))
        if centered:
            out.append(("softmax._softmax_bwd_kernel", {"DY": p, "Y": p, "DX": p, "N": "i32", "scale": "fp32"}, block))
    return out


def compile_all(archs=(90, 80), verbose=False) -> int:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    n = 0
    for arch in archs:
        for name, sig, consts in _variants():
            module, kernel = name.split(".")
            fn = getattr(importlib.import_module(f"lmfast.kernels.{module}"), kernel)
            signature = {**sig, **{k: "constexpr" for k in consts}}
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                      target=GPUTarget("cuda", arch, 32))
            assert compiled.asm.get("cubin"), f"{name} {consts}: no cubin for sm_{arch}"
            n += 1
            if verbose:
                print(f"sm_{arch} {name} {sig['X' if 'X' in sig else 'DY']} {consts}")
    return n


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_and_sm80():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; fusion is the default
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert f"compiled {2 * len(_variants())} kernel variants" in out.stdout, out.stdout[-2000:]


if __name__ == "__main__":
    count = compile_all(verbose="-v" in sys.argv)
    print(f"compiled {count} kernel variants")
