// Kernels with the faults the emulator must catch, for tests/test_cuda_emulation.py: a test of
// the emulated CUDA kernels means something only if the emulator fails these.
//   lmfast_cuda_emulation::selftest(name) runs one and returns its output (float32, one value
//   per thread), or raises the emulator's error.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>

#include "../device.cuh"

namespace {

using namespace lmfast::cuda;

// Thread t posts t, then reads thread t+1's post: with `sync` false nothing orders the read
// after that write, so some thread reads unwritten (NaN-filled) shared memory in either order.
__global__ void neighbour_kernel(float* out, bool sync) {
  LMFAST_DYNAMIC_SHARED(float, posts);
  const int t = threadIdx.x, n = blockDim.x;
  posts[t] = float(t);
  if (sync) __syncthreads();
  out[t] = posts[(t + 1) % n];
}

// Half of each warp waits at __syncthreads, the other half at __syncwarp: a hang on a GPU.
__global__ void divergent_barriers_kernel(float* out) {
  if ((threadIdx.x & 31) < 16) __syncthreads();
  else __syncwarp();
  out[threadIdx.x] = 1.f;
}

// Threads past the first warp leave before the barrier the first warp waits at.
__global__ void exit_before_syncthreads_kernel(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Half the lanes leave before the shuffle the other half makes.
__global__ void shuffle_with_exited_lanes_kernel(float* out) {
  if ((threadIdx.x & 31) >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

// A 16-byte vector load from an address 4 bytes past a 16-byte boundary.
__global__ void misaligned_load_kernel(float* out, const float* in) {
  float v[4];
  load_floats<float, 4>(in + 1, v);
  out[threadIdx.x] = v[0];
}

// Rounds of __syncthreads_or: in round r only thread (r * 7) % blockDim.x votes true, except
// in every third round, where no thread does; out[t] counts the rounds thread t saw true
// (every thread: 2 of 3 rounds). A lost or stale vote changes some thread's count.
__global__ void vote_kernel(float* out) {
  int seen = 0;
  for (int r = 0; r < 9; ++r) seen += __syncthreads_or(r % 3 != 2 && int(threadIdx.x) == (r * 7) % int(blockDim.x));
  out[threadIdx.x] = float(seen);
}

__global__ void big_shared_kernel(float* out) {
  LMFAST_DYNAMIC_SHARED(float, buf);
  buf[threadIdx.x] = 1.f;
  out[threadIdx.x] = buf[threadIdx.x];
}

at::Tensor selftest(const std::string& name) {
  const int threads = 64;
  at::Tensor out = at::zeros({threads}, at::kFloat);
  at::Tensor in = at::zeros({threads + 8}, at::kFloat);
  float* o = out.data_ptr<float>();
  cudaStream_t stream = nullptr;
  if (name == "missing_barrier") launch(neighbour_kernel, 1, threads, threads * sizeof(float), stream, o, false);
  else if (name == "barrier") launch(neighbour_kernel, 1, threads, threads * sizeof(float), stream, o, true);
  else if (name == "vote") launch(vote_kernel, 1, threads, 0, stream, o);
  else if (name == "divergent_barriers") launch(divergent_barriers_kernel, 1, threads, 0, stream, o);
  else if (name == "exit_before_syncthreads") launch(exit_before_syncthreads_kernel, 1, threads, 0, stream, o);
  else if (name == "shuffle_with_exited_lanes") launch(shuffle_with_exited_lanes_kernel, 1, threads, 0, stream, o);
  else if (name == "misaligned_load")
    launch(misaligned_load_kernel, 1, threads, 0, stream, o, static_cast<const float*>(in.data_ptr<float>()));
  else if (name == "shared_past_48k_without_opt_in") launch(big_shared_kernel, 1, threads, 64 * 1024, stream, o);
  else TORCH_CHECK(false, "selftest: no case ", name);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmfast_cuda_emulation, m) { m.def("selftest(str name) -> Tensor", &selftest); }
