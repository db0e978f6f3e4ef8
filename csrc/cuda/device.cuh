// Device-side helpers shared by the CUDA kernels: element conversions, 128-bit vector loads
// and stores, warp and block reductions, and the launch geometry.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels.h"
#include "row_math.h"

// Built by nvcc this is CUDA; built by the host compiler with LMFAST_CUDA_EMULATION (the
// headers of csrc/cuda/emulation/include first on the include path) the same kernels run on
// CPU fibers, one per CUDA thread, for tests/test_cuda_emulation.py. The two builds differ
// in the two macros and launch() below, and in ops.h's device check, nowhere else. No ATen
// here (kernels.h says why).
#ifdef LMFAST_CUDA_EMULATION
#include "emulation/emulator.h"
// The block's dynamic shared memory (the launch's smem bytes, filled with 0xff: NaN floats).
#define LMFAST_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::lmfast_emulation::dynamic_shared())
// A vector access must be aligned to its size on a GPU (else "misaligned address"); x86 would not notice.
#define LMFAST_CHECK_ALIGNED(p, bytes) ::lmfast_emulation::check_aligned(p, bytes, __FILE__, __LINE__)
#else
#define LMFAST_DYNAMIC_SHARED(type, name) extern __shared__ __align__(128) type name[]
#define LMFAST_CHECK_ALIGNED(p, bytes) ((void)0)
#endif

namespace lmfast::cuda {

using namespace lmfast::cuda_math;

// ---- element conversions (all math is float32) ----------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(bool v) { return v ? 1.f : 0.f; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Rounds v to T and back: what a tensor of dtype T would hold (e.g. x + residual in eager).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// ---- vector memory access --------------------------------------------------------------------

// VEC consecutive elements, loaded or stored as one 128-bit access when VEC * sizeof(T) == 16
// (the launcher picks VEC = 1 unless every row start is 16-byte aligned).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[VEC]) {
  LMFAST_CHECK_ALIGNED(p, sizeof(T) * VEC);
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_float(pk.v[e]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[VEC]) {
  LMFAST_CHECK_ALIGNED(p, sizeof(T) * VEC);
  Pack<T, VEC> pk;
#pragma unroll
  for (int e = 0; e < VEC; ++e) pk.v[e] = from_float<T>(in[e]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// ---- reductions ----------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ Compensated warp_compensated(Compensated c) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Compensated other{__shfl_xor_sync(0xffffffffu, c.hi, o), __shfl_xor_sync(0xffffffffu, c.lo, o)};
    c = compensated_merge(c, other);
  }
  return c;
}

__device__ __forceinline__ RowMax warp_rowmax(RowMax s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    RowMax other{__shfl_xor_sync(0xffffffffu, s.max, o), __shfl_xor_sync(0xffffffffu, s.sum, o)};
    s = rowmax_merge(s, other);
  }
  return s;
}

// A reduction over the threads that share one row: a warp (group == 32) or the whole block.
// Every thread of the group gets the result. The block case goes through `scratch` (32
// slots of T in shared memory) and synchronizes the block; the block size is chosen at run
// time from the row length, which is why this is not cub::BlockReduce (its block size is a
// template argument). The order of the merges is fixed: results are deterministic.
template <typename T, typename WarpOp, typename Merge>
__device__ __forceinline__ T group_reduce(T v, int group, T* scratch, WarpOp warp_op, Merge merge) {
  v = warp_op(v);
  if (group == 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < warps; ++w) r = merge(r, scratch[w]);
  return r;
}

__device__ __forceinline__ float group_sum(float v, int group, float* scratch) {
  return group_reduce(v, group, scratch, warp_sum, [](float a, float b) { return a + b; });
}

__device__ __forceinline__ float group_max(float v, int group, float* scratch) {
  return group_reduce(v, group, scratch, warp_max, [](float a, float b) { return max_nan(a, b); });
}

// ---- launch geometry ----------------------------------------------------------------------

// Rows of up to `warp_row_max` elements get one warp each (kRowsPerBlock rows per block);
// longer rows get a whole block, of enough threads that each holds at most `per_thread`
// elements (up to 1024 threads). `cached`: the row fits the group at `per_thread` elements
// a thread (kept in registers); a longer row is looped over instead.
constexpr int kWarpRowMax = 1024;
constexpr int kRowsPerBlock = 4;
constexpr int kCachedPerThread = 32;

// Orders the group's shared/global memory accesses: a warp's, or the block's.
__device__ __forceinline__ void sync_group(int group) {
  if (group == 32) __syncwarp();
  else __syncthreads();
}

// This thread's place among the row groups of the grid (group: 32 or blockDim.x threads per
// row): its index within its group, its group's first row, and the stride to its next row.
struct RowGroup {
  int tid;
  int64_t first, step;
};

__device__ __forceinline__ RowGroup row_group(int group) {
  const int64_t groups_per_block = blockDim.x / group;
  return {group == 32 ? int(threadIdx.x & 31) : int(threadIdx.x),
          blockIdx.x * groups_per_block + threadIdx.x / group, gridDim.x * groups_per_block};
}

struct RowGeometry {
  int threads;         // block size
  int group;           // threads per row: 32 (a warp) or `threads`
  int64_t blocks;      // grid size (rows are strided over it)
  bool cached;         // the row fits the group's registers
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// rows x N elements read as `vec`-wide vectors; `max_blocks` caps the grid (the kernels
// stride over the rows).
inline RowGeometry row_geometry(int64_t rows, int64_t N, int64_t warp_row_max, int per_thread, int vec,
                                int64_t max_blocks) {
  RowGeometry g;
  if (N <= warp_row_max) {
    g.threads = 32 * kRowsPerBlock;
    g.group = 32;
    g.blocks = ceil_div(rows, kRowsPerBlock);
  } else {
    // enough threads that each holds <= kCachedPerThread elements, up to 1024
    const int64_t want = ceil_div(ceil_div(N, per_thread), 32) * 32;
    g.threads = int(want < 128 ? 128 : want > 1024 ? 1024 : want);
    g.group = g.threads;
    g.blocks = rows;
  }
  g.cached = N <= int64_t(g.group) * per_thread && per_thread % vec == 0;
  if (g.blocks > max_blocks) g.blocks = max_blocks;
  if (g.blocks < 1) g.blocks = 1;
  return g;
}

// ---- host-side launch helpers --------------------------------------------------------------

// A CUDA runtime call's error as an exception (a RuntimeError in Python), naming the call.
inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("lmfast cuda: ") + what + ": " + cudaGetErrorString(e));
}

// The error of the launches before it, if any (a bad configuration, too much shared memory).
inline void check_launch() { check_cuda(cudaGetLastError(), "kernel launch"); }

// The current device's multiprocessor count (cached per device).
inline int multiprocessors() {
  static int count[64] = {};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 64 && count[dev] > 0) return count[dev];
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  if (dev < 64) count[dev] = n;
  return n;
}

// kernel<<<grid, block, smem_bytes, stream>>>(args...); under LMFAST_CUDA_EMULATION, the same
// launch run on CPU fibers (csrc/cuda/emulation/emulator.h).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
            Args&&... args) {
#ifdef LMFAST_CUDA_EMULATION
  (void)stream;
  ::lmfast_emulation::launch(kernel, grid, block, smem_bytes, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

// Elements per access: 16 bytes' worth (a 128-bit load/store) when N is a multiple of it and
// every given pointer (nullptr: an absent tensor) is 16-byte aligned (rows of N then stay
// aligned), else 1.
template <typename T>
int vector_width(int64_t N, std::initializer_list<const void*> pointers) {
  constexpr int kVec = 16 / sizeof(T);
  if (N % kVec != 0) return 1;
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return kVec;
}

// fn.template operator()<T>() with T the CUDA element type of dtype t.
template <typename Fn>
void for_dtype(Dtype t, Fn&& fn) {
  switch (t) {
    case Dtype::kFloat32: fn.template operator()<float>(); break;
    case Dtype::kFloat16: fn.template operator()<__half>(); break;
    case Dtype::kBFloat16: fn.template operator()<__nv_bfloat16>(); break;
  }
}

}  // namespace lmfast::cuda
