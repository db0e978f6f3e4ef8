// The CPU kernel ops of lmfast._C, forwarded to the kernel library loaded for this CPU.
//
// lmfast/_extension.py asks which ISA levels the CPU runs (cpu_levels), picks one, and hands
// its library's path to load_cpu_kernels, once, before any kernel runs. A kernel op called
// with no library loaded is an error that says so, never a crash.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <atomic>
#include <mutex>
#include <string>

#include "cpu/kernel_table.h"
#include "ops.h"

namespace lmfast::dispatch {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using cpu::KernelTable;

std::atomic<const KernelTable*> loaded_table{nullptr};
std::mutex load_mutex;

const KernelTable& kernels() {
  const KernelTable* t = loaded_table.load(std::memory_order_acquire);
  TORCH_CHECK(t != nullptr, "lmfast: no CPU kernel library is loaded (lmfast._extension loads "
              "one when the cpu backend is first used)");
  return *t;
}

// ---- the kernel ops' CPU impls: the loaded library's kernels ------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& w,
                                                          const OptTensor& b, const OptTensor& r,
                                                          double eps) {
  return kernels().layer_norm_fwd(x, w, b, r, eps);
}
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x, const OptTensor& w,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const OptTensor& dres, bool wg, bool bg, double eps) {
  return kernels().layer_norm_bwd(dy, x, w, mean, rstd, dres, wg, bg, eps);
}
std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x, const OptTensor& w,
                                                const OptTensor& r, double eps, double w_offset) {
  return kernels().rms_norm_fwd(x, w, r, eps, w_offset);
}
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x, const OptTensor& w,
                                        const Tensor& rstd, const OptTensor& dres, bool wg, double eps,
                                        double w_offset) {
  return kernels().rms_norm_bwd(dy, x, w, rstd, dres, wg, eps, w_offset);
}
Tensor softmax_fwd(const Tensor& x, const OptTensor& mask, double scale, bool causal) {
  return kernels().softmax_fwd(x, mask, scale, causal);
}
Tensor softmax_bwd(const Tensor& dy, const Tensor& y, double scale) {
  return kernels().softmax_bwd(dy, y, scale);
}
std::tuple<Tensor, Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const OptTensor& mask, double scale, bool causal,
                                                 std::optional<int64_t> window, double dropout_p,
                                                 const OptTensor& seed, double softcap, const OptTensor& cu_seqlens_q,
                                                 const OptTensor& cu_seqlens_k) {
  return kernels().attention_fwd(q, k, v, mask, scale, causal, window, dropout_p, seed, softcap, cu_seqlens_q,
                                 cu_seqlens_k);
}
std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
    const Tensor& row_stats, const OptTensor& dlse, const OptTensor& mask, double scale, bool causal,
    std::optional<int64_t> window, bool mask_grad, double dropout_p, const OptTensor& seed, double softcap,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k) {
  return kernels().attention_bwd(dout, q, k, v, o, row_stats, dlse, mask, scale, causal, window, mask_grad,
                                 dropout_p, seed, softcap, cu_seqlens_q, cu_seqlens_k);
}

}  // namespace

// The ISA levels this CPU (and its OS) can run, best first, comma-separated. The levels
// match lmfast/_build_flags.py: avx512 = x86-64-v4 (AVX-512 F/BW/CD/DQ/VL), avx512bf16 = that
// and AVX512-BF16, avx2 = x86-64-v3 (AVX2, FMA, F16C, BMI1/2, MOVBE); default runs anywhere.
// libgcc's checks include the OS's support for the vector registers (XCR0).
std::string cpu_levels() {
  std::string levels;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
                  __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("movbe");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  if (v4 && __builtin_cpu_supports("avx512bf16")) levels += "avx512bf16,";
  if (v4) levels += "avx512,";
  if (v3) levels += "avx2,";
#endif
  return levels + "default";
}

// Loads the kernel library at `path` (once per process: a second call must name the same
// level) and returns its "level;capability".
std::string load_cpu_kernels(const std::string& path) {
  std::lock_guard<std::mutex> guard(load_mutex);
  // RTLD_LOCAL: the library's symbols stay its own (it exports only the table anyway).
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "lmfast: cannot load the CPU kernel library ", path, ": ", dlerror());
  using TableFn = const KernelTable* (*)();
  auto fn = reinterpret_cast<TableFn>(dlsym(handle, "lmfast_cpu_kernel_table"));
  TORCH_CHECK(fn != nullptr, "lmfast: ", path, " is not an lmfast CPU kernel library");
  const KernelTable* table = fn();
  TORCH_CHECK(table->version == cpu::kKernelTableVersion, "lmfast: ", path, " has kernel table version ",
              table->version, ", this lmfast._C wants ", cpu::kKernelTableVersion, "; reinstall lmfast");
  const KernelTable* current = loaded_table.load();
  TORCH_CHECK(current == nullptr || current == table || std::string(current->level) == table->level,
              "lmfast: the ", current ? current->level : "", " CPU kernels are loaded already; one "
              "process runs one level (set LMFAST_CPU_ISA before lmfast loads them)");
  if (current == nullptr) loaded_table.store(table, std::memory_order_release);
  const KernelTable& t = *loaded_table.load();
  return std::string(t.level) + ";" + t.capability;
}

std::string bf16_attention_unit() { return kernels().bf16_attention_unit(); }

// "level;capability" of the loaded library, or "none;none".
std::string loaded_cpu_kernels() {
  const KernelTable* t = loaded_table.load();
  return t ? std::string(t->level) + ";" + t->capability : "none;none";
}

}  // namespace lmfast::dispatch

TORCH_LIBRARY_IMPL(lmfast_C, CPU, m) {
  namespace d = lmfast::dispatch;
  m.impl("layer_norm_fwd", &d::layer_norm_fwd);
  m.impl("layer_norm_bwd", &d::layer_norm_bwd);
  m.impl("rms_norm_fwd", &d::rms_norm_fwd);
  m.impl("rms_norm_bwd", &d::rms_norm_bwd);
  m.impl("softmax_fwd", &d::softmax_fwd);
  m.impl("softmax_bwd", &d::softmax_bwd);
  m.impl("attention_fwd", &d::attention_fwd);
  m.impl("attention_bwd", &d::attention_bwd);
}
