// The emulated CUDA kernel ops, as lmfast_cuda_emulation::<op>: the same entry points as
// lmfast_C's CUDA kernels (csrc/cuda/ops.h), taking CPU tensors.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "../../documents.h"
#include "../ops.h"

namespace {

// (tests) documents::document_run of every program of a launch over the int32 boundaries cu:
// (programs, 2) int32, each program's [start, end).
at::Tensor document_runs(const at::Tensor& cu, int64_t block) {
  const at::Tensor c = cu.to(at::kInt).contiguous();
  const int64_t n_docs = c.numel() - 1, programs = c.const_data_ptr<int>()[n_docs] / block + n_docs;
  at::Tensor out = at::empty({programs, 2}, c.options());
  for (int64_t pid = 0; pid < programs; ++pid) {
    const lmfast::documents::Run run = lmfast::documents::document_run(pid, c.const_data_ptr<int>(), n_docs, block);
    out.data_ptr<int>()[2 * pid] = int(run.start);
    out.data_ptr<int>()[2 * pid + 1] = int(run.end);
  }
  return out;
}

}  // namespace

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
  m.def("document_runs", &document_runs);        // (tests: the prefill blocks' runs of one document)
}
