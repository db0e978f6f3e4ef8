// Attention dropout's mask: whether entry (row, key j) of softmax(s) is kept, as a hash of
// (seed, row, j), row = (b * Hq + h) * Sq + i. A hash, not a random stream, so a backward
// regenerates its forward's mask and no tiling or thread count changes it. The specification
// is lmfast/reference.py's dropout_keep; the CPU kernels (csrc/cpu/attention.cpp) and the CUDA
// kernels (csrc/cuda/attention.cu) include this header, lmfast/kernels/attention.py (Triton)
// writes the same arithmetic.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LMFAST_HASH_HD __host__ __device__ __forceinline__
#else
#define LMFAST_HASH_HD inline
#endif

namespace lmfast::dropout {

// A 32-bit integer hash (C. Wellons' lowbias32).
LMFAST_HASH_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The hash of one row (from the 64-bit seed and row index), computed once per row.
LMFAST_HASH_HD uint32_t row_key(uint64_t seed, uint64_t row) {
  return mix32(mix32(uint32_t(row) ^ uint32_t(seed)) ^ uint32_t(row >> 32) ^ uint32_t(seed >> 32));
}

// Whether key j of the row with key `rk` is kept (threshold: see keep_threshold).
LMFAST_HASH_HD bool kept(uint32_t rk, int64_t j, uint32_t threshold) {
  return mix32(rk ^ (uint32_t(j) * 0x9e3779b9u)) >= threshold;
}

// Entries whose hash is below floor(p * 2^32) are dropped (p in [0, 1)).
inline uint32_t keep_threshold(double p) { return uint32_t(std::fmin(std::floor(p * 4294967296.0), 4294967295.0)); }

}  // namespace lmfast::dropout
