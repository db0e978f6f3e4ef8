// Registers lmfast's C++ ops as torch.ops.lmfast_C.*:
//   public ops   layer_norm, rms_norm, softmax, attention: argument checks and shaping, then
//                the kernel ops (csrc/api.cpp; CompositeImplicitAutograd, so torch.compile
//                traces them into the kernel ops). lmfast.ops and lmfast.nn call these for
//                backend="cpu".
//   kernel ops   *_fwd / *_bwd: the kernels (csrc/cpu/, reached through csrc/dispatch.cpp),
//                their autograd (csrc/api.cpp); fake impls are registered in Python
//                (lmfast/ops/*.py), beside the Triton twins.
//   loading      cpu_levels, load_cpu_kernels: lmfast/_extension.py picks and loads the
//                kernel library of this CPU's ISA level (csrc/cpu/kernel_table.h);
//                bf16_attention_unit: what that library multiplies bfloat16 attention tiles on.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "ops.h"

#ifndef LMFAST_TORCH_VERSION  // set by lmfast/_build_flags.py, unquoted
#define LMFAST_TORCH_VERSION unknown
#endif
#define LMFAST_STR2(x) #x
#define LMFAST_STR(x) LMFAST_STR2(x)

namespace lmfast::cpu {

// "torch=<version built against>;isa=<loaded kernel level>;capability=<its ATen vector
// ISA>;openmp=<0|1>"; isa=none until lmfast._extension has loaded a kernel library.
std::string build_info() {
  const std::string loaded = lmfast::dispatch::loaded_cpu_kernels();  // "level;capability"
  const auto split = loaded.find(';');
  std::string info = "torch=" LMFAST_STR(LMFAST_TORCH_VERSION) ";isa=" + loaded.substr(0, split) +
                     ";capability=" + loaded.substr(split + 1);
#ifdef _OPENMP
  info += ";openmp=1";
#else
  info += ";openmp=0";
#endif
  return info;
}

}  // namespace lmfast::cpu

TORCH_LIBRARY(lmfast_C, m) {
  m.def("build_info() -> str", &lmfast::cpu::build_info);
  m.def("cpu_levels() -> str", &lmfast::dispatch::cpu_levels);
  m.def("load_cpu_kernels(str path) -> str", &lmfast::dispatch::load_cpu_kernels);
  m.def("bf16_attention_unit() -> str", &lmfast::dispatch::bf16_attention_unit);
  // public ops
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps)"
        " -> (Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor? weight, Tensor? residual, float eps, float weight_offset=0.)"
        " -> (Tensor, Tensor)");
  m.def("softmax(Tensor x, int dim, float scale, Tensor? mask, bool causal) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool causal, float? scale,"
        " int? window, float dropout_p=0., Tensor? dropout_seed=None, float? softcap=None, Tensor? cu_seqlens_q=None,"
        " Tensor? cu_seqlens_k=None) -> (Tensor, Tensor)");
  // kernel ops
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd,"
        " Tensor? dresidual_out, bool weight_grad, bool bias_grad, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, Tensor? residual, float eps, float weight_offset=0.)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, Tensor? dresidual_out,"
        " bool weight_grad, float eps, float weight_offset=0.) -> (Tensor, Tensor)");
  m.def("softmax_fwd(Tensor x, Tensor? mask, float scale, bool causal) -> Tensor");
  m.def("softmax_bwd(Tensor dy, Tensor y, float scale) -> Tensor");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal,"
        " int? window, float dropout_p=0., Tensor? dropout_seed=None, float softcap=0., Tensor? cu_seqlens_q=None,"
        " Tensor? cu_seqlens_k=None) -> (Tensor, Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor row_stats,"
        " Tensor? dlse, Tensor? mask, float scale, bool causal, int? window, bool mask_grad,"
        " float dropout_p=0., Tensor? dropout_seed=None, float softcap=0., Tensor? cu_seqlens_q=None,"
        " Tensor? cu_seqlens_k=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lmfast_C, CompositeImplicitAutograd, m) {
  m.impl("layer_norm", &lmfast::api::layer_norm);
  m.impl("rms_norm", &lmfast::api::rms_norm);
  m.impl("softmax", &lmfast::api::softmax);
  m.impl("attention", &lmfast::api::attention);
}

TORCH_LIBRARY_IMPL(lmfast_C, Autograd, m) {
  m.impl("layer_norm_fwd", &lmfast::api::layer_norm_fwd_autograd);
  m.impl("rms_norm_fwd", &lmfast::api::rms_norm_fwd_autograd);
  m.impl("softmax_fwd", &lmfast::api::softmax_fwd_autograd);
  m.impl("attention_fwd", &lmfast::api::attention_fwd_autograd);
}

// `import lmfast._C` (ahead-of-time build) loads the library above; the module itself is empty.
// The first-use (JIT) build loads the same code with torch.ops.load_library instead.
static PyModuleDef lmfast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "lmfast C++ kernels; ops live in torch.ops.lmfast_C", -1,
                                      nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lmfast_c_module); }
