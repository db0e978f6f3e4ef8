// The CUDA twins of the kernel ops in csrc/ops.h (lmfast::cpu), same signatures and
// contracts, registered for the CUDA dispatch key in csrc/cuda/register.cpp. ops.cpp holds
// them: the tensor work (checks, outputs, device guard, stream) around the launches that each
// .cu file exports for one op family (kernels.h, which keeps ATen out of nvcc's passes).
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <optional>
#include <tuple>

namespace lmfast::cuda {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias,
                                                          const std::optional<Tensor>& residual, double eps);
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x,
                                                  const std::optional<Tensor>& weight, const Tensor& mean,
                                                  const Tensor& rstd, const std::optional<Tensor>& dresidual_out,
                                                  bool weight_grad, bool bias_grad, double eps);
std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                                const std::optional<Tensor>& residual, double eps,
                                                double weight_offset);
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                        const Tensor& rstd, const std::optional<Tensor>& dresidual_out,
                                        bool weight_grad, double eps, double weight_offset);
Tensor softmax_fwd(const Tensor& x, const std::optional<Tensor>& mask, double scale, bool causal);
Tensor softmax_bwd(const Tensor& dy, const Tensor& y, double scale);
// Forward only: the backward on CUDA tensors is the Triton kernel's (lmfast/ops/attention.py
// registers it for lmfast_C::attention_bwd's CUDA key), which takes the row stats returned
// here. dropout_seed: on q's device.
std::tuple<Tensor, Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const std::optional<Tensor>& mask, double scale, bool causal,
                                                 std::optional<int64_t> window, double dropout_p,
                                                 const std::optional<Tensor>& dropout_seed, double softcap,
                                                 const std::optional<Tensor>& cu_seqlens_q = std::nullopt,
                                                 const std::optional<Tensor>& cu_seqlens_k = std::nullopt);
// Packed documents' table of the kernels (../documents.h), built on cu_q's device by one kernel:
// (2 Sq + n_docs + 2,) int32, each query row's [lo, hi) keys (lo's, then hi's), cu_seqlens_q
// (clamped to [0, Sq]: the prefill blocks' runs of one document), then 1 if the boundaries are
// valid, else 0 (attention_fwd asserts it without waiting on the device; on CPU tensors,
// the host emulator's, it checks them on the host first, with ValueErrors).
Tensor document_bands(const Tensor& cu_q, const Tensor& cu_k, int64_t Sq, int64_t Sk, bool causal,
                      std::optional<int64_t> window);

// The launch-level contract (the public ops checked the user's input): CUDA tensors on one
// device, contiguous unless the op says otherwise. null entries are absent optionals.
inline void check_cuda_contiguous(const char* op, std::initializer_list<const Tensor*> tensors,
                                  bool need_contiguous = true) {
  const Tensor* first = nullptr;
  for (const Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
#ifdef LMFAST_CUDA_EMULATION  // (the host emulation runs the kernels on CPU tensors)
    TORCH_CHECK(t->is_cpu(), "lmfast_cuda_emulation::", op, ": expected CPU tensors, got one on ", t->device());
#else
    TORCH_CHECK(t->is_cuda(), "lmfast_C::", op, " (cuda): expected CUDA tensors, got one on ", t->device());
#endif
    TORCH_CHECK(!need_contiguous || t->is_contiguous(), "lmfast_C::", op, " (cuda): expected contiguous tensors");
    if (first == nullptr) first = t;
    TORCH_CHECK(t->device() == first->device(), "lmfast_C::", op, " (cuda): tensors on ", first->device(),
                " and ", t->device());
  }
}

}  // namespace lmfast::cuda
