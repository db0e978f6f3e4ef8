"""Every Triton kernel compiles ahead of time for NVIDIA Hopper (sm_90) and Ampere (sm_80), on
any machine, without a GPU: each flag value and dtype in some variant (_variants: which ones,
and why not every combination).

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


def _norm_softmax_flag_sets():
    """(dtype, one_block, centered) to compile the norm and softmax kernels for: every
    combination of the flags once, the dtypes in turn (about 1 s per compile; 168 compiles,
    81 s of a CI run, when every dtype took every combination), and each dtype with each
    value of each flag. What the real compiler rejects and the interpreter accepts is a
    construct under some flag, or a type under some dtype; the interpreter's tests run every
    dtype with every flag set."""
    combos = list(itertools.product((True, False), (True, False)))  # (one_block, centered)
    out = [(list(DTYPES)[i % len(DTYPES)], *combo) for i, combo in enumerate(combos)]
    for dt in DTYPES:  # each dtype with each value of each flag
        for flag in (0, 1):
            for value in (True, False):
                if not any(d == dt and c[flag] == value for d, *c in out):
                    other = next(c for c in combos if c[flag] == value)
                    out.append((dt, *other))
    return out


def _variants():
    """(kernel name, signature, constexprs, options, archs) for every variant worth compiling.
    sm_80 compiles the bfloat16 variants (the dtype whose instructions differ most between the
    two), sm_90 all."""
    out = []
    for dt, one_block, centered in _norm_softmax_flag_sets():
        p = f"*{dt}"
        block = {"BLOCK_N": 1024 if one_block else 8192, "ONE_BLOCK": one_block, "INTERPRETED": False}
        archs = (90, 80) if dt == "bf16" else (90,)
        for full in (True, False):  # every optional input present / absent (RMSNorm: weight_offset too)
            shift_w = full and not centered
            out.append(("norm._norm_fwd_kernel",
                        {"X": p, "RES": p, "W": p, "B": p, "Y": p, "RES_OUT": p, "MEAN": "*fp32",
                         "RSTD": "*fp32", "N": "i32", "eps": "fp32", "w_offset": "fp32"},
                        {"CENTERED": centered, "HAS_RES": full, "HAS_W": full, "SHIFT_W": shift_w,
                         "HAS_B": full and centered, **block}, {}, archs))
            bwd_signature = {"DY": p, "X": p, "W": p, "MEAN": "*fp32", "RSTD": "*fp32", "DRES": p, "DX": p,
                             "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "rows": "i32", "N": "i32",
                             "rows_per_program": "i32", "eps": "fp32", "w_offset": "fp32"}
            bwd_flags = {"CENTERED": centered, "HAS_W": full, "SHIFT_W": shift_w, "HAS_DRES": full, "W_GRAD": full,
                         "B_GRAD": full and centered}
            out.append(("norm._norm_bwd_kernel", bwd_signature, {**bwd_flags, **block, "EXACT": False}, {}, archs))
            if one_block:  # rows of <= 8 elements: the float64 path
                out.append(("norm._norm_bwd_kernel", bwd_signature,
                            {**bwd_flags, **block, "BLOCK_N": 8, "EXACT": True}, {}, archs))
        # softmax has no `centered`: its flag sets ride on those of the norms
        for mask in ("none", "bool", "additive") if centered else ():
            out.append(("softmax._softmax_fwd_kernel",
                        {"X": p, "Y": p, "MASK": "*u8" if mask == "bool" else p, "stride_mb": "i64",
                         "stride_mh": "i64", "stride_mm": "i64", "stride_mn": "i64", "H": "i32",
                         "M": "i32", "N": "i32", "scale": "fp32"},
                        {"HAS_MASK": mask != "none", "BOOL_MASK": mask == "bool", "CAUSAL": mask != "additive", **block},
                        {}, archs))
        if not centered:
            out.append(("softmax._softmax_bwd_kernel", {"DY": p, "Y": p, "DX": p, "N": "i32", "scale": "fp32"},
                        {**block, "RENORMALIZE": dt != "fp32"}, {}, archs))
    return out + _attention_variants()


def _attention_variants():
    """Attention kernels (about 5 s each to compile): every kernel for each dtype, the dtypes
    spread over the flag sets and head-dim buckets, the first autotune config of the bucket.
    Autotuning skips configs that do not fit a GPU's shared memory, so configs are not swept."""
    from lmfast.kernels import attention as A

    out = []
    # (bf16: DeepSeek's multi-head latent attention, q and k heads of 192, v heads of 128)
    for dt, flags_on, block_d, block_dv in (("fp32", False, 64, 64), ("fp16", True, 128, 128), ("bf16", True, 256, 128)):
        p = f"*{dt}"
        mask = "*u8" if dt == "fp16" else p  # fp16 runs the bool mask
        # (bf16 also compiles the packed documents' row and key bands, which replace the
        # causal/window arithmetic that fp16 compiles)
        flags = {"CAUSAL": flags_on, "WINDOW": flags_on, "DOCS": dt == "bf16", "HAS_MASK": flags_on, "BOOL_MASK": dt == "fp16", "DROPOUT": flags_on,
                 "SOFTCAP": flags_on, "BLOCK_D": block_d, "BLOCK_DV": block_dv, "UPCAST": False, "PRECISION": "ieee", "INTERPRETED": False}
        dims = {"Hq": "i32", "Hkv": "i32", "Sq": "i32", "Sk": "i32", "D": "i32", "Dv": "i32", "scale": "fp32", "softcap": "fp32",
                "window": "i32",
                # dropout: the threshold is i32 or i64 as its value falls (Triton types int arguments so)
                "SEED": "*i64", "threshold": "i64" if dt == "bf16" else "i32", "keep_scale": "fp32", "BANDS": "*i32"}
        mask_sig = {"MASK": mask, "smb": "i64", "smh": "i64", "smq": "i64", "smk": "i64"}
        buckets = {"Q_BUCKET": "i32", "K_BUCKET": "i32"}
        archs = (90, 80) if dt == "bf16" else (90,)

        def tuned(table, sig, consts):
            cfg = table[A._tile_bucket(consts)][0]
            out.append((f"attention.{name}", sig, {**consts, **cfg.kwargs},
                        {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, archs))

        name = "_attn_fwd_kernel"
        tuned(A.FWD_CONFIGS, {"Q": p, "K": p, "V": p, "O": p, "LSE": "*fp32", "ROW_MAX": "*fp32", "ROW_INV_SUM": "*fp32", **mask_sig, **dims, "n_docs": "i32", **buckets}, flags)
        name = "_attn_bwd_dq_kernel"
        tuned(A.BWD_DQ_CONFIGS, {"Q": p, "K": p, "V": p, "DO": p, "ROW_MAX": "*fp32", "ROW_INV_SUM": "*fp32",
                                 "DELTA": "*fp32", "DLSE": "*fp32", "DQ": p, "DMASK": p, **mask_sig, **dims, "n_docs": "i32", **buckets},
              {**flags, "HAS_DLSE": flags_on, "MASK_GRAD": flags_on and dt == "bf16"})
        name = "_attn_bwd_dkdv_kernel"
        tuned(A.BWD_DKDV_CONFIGS, {"Q": p, "K": p, "V": p, "DO": p, "ROW_MAX": "*fp32", "ROW_INV_SUM": "*fp32",
                                   "DELTA": "*fp32", "DLSE": "*fp32", "DK": p, "DV": p, **mask_sig, **dims, "n_docs": "i32", **buckets},
              {**flags, "HAS_DLSE": flags_on})
        out.append(("attention._attn_fwd_split_kernel",
                    {"Q": p, "K": p, "V": p, "O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32", **mask_sig,
                     **dims, "keys_per_split": "i32", "rows_total": "i32"},
                    {**flags, "BLOCK_M": 16, "BLOCK_N": 64}, {"num_warps": 4, "num_stages": 2}, (90,)))
        out.append(("attention._attn_combine_kernel",
                    {"O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32", "O": p, "LSE": "*fp32",
                     "ROW_MAX": "*fp32", "ROW_INV_SUM": "*fp32", "rows_total": "i32", "splits": "i32", "Hq": "i32", "Sq": "i32", "Dv": "i32"},
                    {"BLOCK_S": 16, "BLOCK_DV": block_dv, "INTERPRETED": False}, {"num_warps": 4}, (90,)))
        out.append(("attention._attn_bwd_delta_kernel",
                    {"DO": p, "O": p, "DELTA": "*fp32", "rows": "i32", "D": "i32"},
                    {"BLOCK_R": 8192 // block_d, "BLOCK_D": block_d}, {}, (90,)))
    # packed documents' table: int32 boundaries with every flag, int64 with none
    for cu, flags_on, archs in (("*i32", True, (90, 80)), ("*i64", False, (90,))):
        out.append(("attention._document_bands_kernel",
                    {"CU_Q": cu, "CU_K": cu, "BANDS": "*i32", "stride_q": "i32", "stride_k": "i32", "n_docs": "i32",
                     "steps": "i32", "Sq": "i32", "Sk": "i32", "window": "i32"},
                    {"CAUSAL": flags_on, "WINDOW": flags_on, "CHECK": flags_on, "BLOCK": 1024}, {"num_warps": 4}, archs))
    return out


def compile_all(archs=(90, 80), verbose=False) -> int:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    n = 0
    for name, sig, consts, options, variant_archs in _variants():
        module, kernel = name.split(".")
        fn = getattr(importlib.import_module(f"lmfast.kernels.{module}"), kernel)
        signature = {**sig, **{k: "constexpr" for k in consts}}
        for arch in set(archs) & set(variant_archs):
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                      target=GPUTarget("cuda", arch, 32), options=options)
            assert compiled.asm.get("cubin"), f"{name} {consts}: no cubin for sm_{arch}"
            # shared memory per block: sm_80 allows 163 KiB, sm_90 227 KiB
            limit = {80: 163, 90: 227}[arch] * 1024
            assert compiled.metadata.shared <= limit, f"{name} {consts}: {compiled.metadata.shared} B shared > sm_{arch}'s"
            n += 1
            if verbose:
                print(f"sm_{arch} {name} {next(iter(sig.values()))} {consts}", flush=True)
    return n


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_and_sm80():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; fusion is the default
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    expected = sum(len(v[4]) for v in _variants())
    assert f"compiled {expected} kernel variants" in out.stdout, out.stdout[-2000:]


if __name__ == "__main__":
    count = compile_all(verbose="-v" in sys.argv)
    print(f"compiled {count} kernel variants")
