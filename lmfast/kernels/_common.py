"""Shared by the Triton kernels: row tiling, program counts, and a rounding fix for the
Triton interpreter."""

import functools
import os

import torch
import triton
import triton.language as tl

# Widest row held in registers as one block; wider rows loop over blocks of this size.
# Tests lower it to exercise the looping path on small shapes.
MAX_BLOCK_N = 8192


def row_blocking(n: int) -> tuple[int, bool, int]:
    """(BLOCK_N, ONE_BLOCK, num_warps) for rows of n elements."""
    block = min(triton.next_power_of_2(max(n, 1)), MAX_BLOCK_N)
    warps = 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 4096 else 16
    return block, n <= block, warps


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_programs(rows: int, n: int, device: torch.device) -> int:
    """Programs for a backward that also sums weight gradients over rows: each program walks a
    contiguous run of rows, summing into one float32 partial row, and the partials are summed
    afterwards. Runs of <= 8 rows keep those float sums about as accurate as torch's cascade
    sum (as csrc/cpu/norm.cpp's RowSum); >= 4 programs per SM keep the GPU busy; the partial
    rows are capped at 2^23 floats (32 MiB) per gradient, past which runs grow longer."""
    sms = _multiprocessors(device.index or 0) if device.type == "cuda" else 1
    by_accuracy = min(-(-rows // 8), max(1, (1 << 23) // max(n, 1)))
    return max(1, min(rows, max(4 * sms, by_accuracy)))


@functools.cache
def interpreted() -> bool:
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1, CPU tensors). Read
    once: Triton itself decides it when the kernels are defined, and every launch asks."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 x cast to `dtype`, rounding to nearest even.

    On a GPU this is x.to(dtype). The Triton interpreter (3.6-3.9) truncates float32 ->
    bfloat16 instead, so there the rounding is done on the bits first (NaN kept as is).
    """
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)
