// The emulated CUDA kernel ops, as lmfast_cuda_emulation::<op>: the same entry points as
// lmfast_C's CUDA kernels (csrc/cuda/launch.h), taking CPU tensors.
#include <torch/library.h>

#include "../launch.h"

TORCH_LIBRARY(lmfast_cuda_emulation, m) {
  namespace c = lmfast::cuda;
  m.def("layer_norm_fwd", &c::layer_norm_fwd);
  m.def("layer_norm_bwd", &c::layer_norm_bwd);
  // (rms_norm and attention_fwd with lmfast_C's defaults: a Python kernel registered for an
  // lmfast_C op is called without the trailing arguments that equal their defaults)
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, Tensor? residual, float eps, float weight_offset=0.)"
        " -> (Tensor, Tensor, Tensor)", &c::rms_norm_fwd);
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, Tensor? dresidual_out,"
        " bool weight_grad, float eps, float weight_offset=0.) -> (Tensor, Tensor)", &c::rms_norm_bwd);
  m.def("softmax_fwd", &c::softmax_fwd);
  m.def("softmax_bwd", &c::softmax_bwd);
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, int? window,"
        " float dropout_p=0., Tensor? dropout_seed=None, float softcap=0., Tensor? cu_seqlens_q=None,"
        " Tensor? cu_seqlens_k=None) -> (Tensor, Tensor, Tensor)",
        &c::attention_fwd);
  m.def("document_bands", &c::document_bands);  // (tests: the table and its check, without the assert)
}
