// The host emulator's launch interface (csrc/cuda/device.cuh: launch() calls it under
// LMFAST_CUDA_EMULATION). See csrc/cuda/emulation/README.md for what it checks.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace lmfast_emulation {

// Runs `thread_body` once per thread of every block of the grid: blocks one after another,
// a block's threads as fibers switched at barriers. Throws std::runtime_error naming the first
// fault (divergent barrier, exited lane in a shuffle, misaligned vector access, ...).
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& thread_body);

void* dynamic_shared();  // the running block's dynamic shared memory
void check_aligned(const void* p, size_t bytes, const char* file, int line);
void report_error(const char* what);  // stops the running thread; the launch throws `what`

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  // the arguments as the kernel's parameter types, converted once, as a launch copies them
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, [&] { std::apply(kernel, params); });
}

}  // namespace lmfast_emulation
