// Host emulation of the parts of the CUDA runtime and device language that csrc/cuda uses, so
// that the host compiler builds the unchanged kernels (csrc/cuda/emulation/README.md). This
// directory comes first on the include path of that build only; nvcc never sees it.
//
// A kernel is a plain function; the emulator (emulator.cpp) runs one block at a time, each
// CUDA thread on its own fiber, switching fibers only at barriers. threadIdx and blockIdx are
// globals that the scheduler sets before it resumes a fiber.
#pragma once

#ifndef LMFAST_CUDA_EMULATION
#error "csrc/cuda/emulation/include is for the host emulation build (-DLMFAST_CUDA_EMULATION) only"
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // one block runs at a time: a function's statics are its block's shared memory

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

// ---- runtime API (what the launchers call) ----------------------------------------------------

typedef struct lmfast_emulated_stream* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
// Records the kernel's opt-in to `value` bytes of dynamic shared memory; a launch past 48 KiB
// without it fails, as on a GPU.
cudaError_t lmfast_emulated_func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return lmfast_emulated_func_set_attribute(reinterpret_cast<const void*>(func), attr, value);
}
// A launch reports its errors by throwing (emulator.cpp): none is left for these to report.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
// One stream, run in order: the fill happens now.
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}

// ---- device functions ----------------------------------------------------------------------

// (sqrtf, expf, logf, fmaf: the C library's. sqrtf and fmaf are exact on both; a GPU's expf
// may be 2 ulps off where glibc's is within 1, a difference the error budget absorbs.)
using std::max;
using std::min;

namespace lmfast_emulation {
void block_barrier();  // __syncthreads
bool block_vote_any(bool vote);  // __syncthreads_or
void warp_barrier();   // __syncwarp, and each half of a shuffle
void require_full_warp_mask(unsigned mask, const char* what);
uint64_t* warp_exchange();  // 32 slots of the calling thread's warp
}  // namespace lmfast_emulation

inline void __syncthreads() { lmfast_emulation::block_barrier(); }
inline int __syncthreads_or(int predicate) { return lmfast_emulation::block_vote_any(predicate != 0); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  lmfast_emulation::require_full_warp_mask(mask, "__syncwarp");
  lmfast_emulation::warp_barrier();
}

// Every lane posts v, the warp meets, each lane reads its partner's, the warp meets again
// (so that the next shuffle cannot overwrite a value not yet read).
// (Only the whole-warp width: the kernels use no other.)
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t));
  lmfast_emulation::require_full_warp_mask(mask, "__shfl_xor_sync");
  const int lane = int(threadIdx.x & 31);
  uint64_t* slots = lmfast_emulation::warp_exchange();
  std::memcpy(&slots[lane], &v, sizeof(T));
  lmfast_emulation::warp_barrier();
  T out;
  std::memcpy(&out, &slots[(lane ^ lane_mask) & 31], sizeof(T));
  lmfast_emulation::warp_barrier();
  return out;
}
