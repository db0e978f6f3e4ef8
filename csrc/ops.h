// Entry points of lmfast._C. Launch-level contracts (the Python op layer validates user
// input first; these only TORCH_CHECK their own preconditions):
//   norms:   x is a contiguous (rows, N) tensor; weight/bias (N,) of x's dtype; mean/rstd are
//            (rows,) in the accumulation dtype (float, or double for double inputs).
//   softmax: x is a contiguous (B, H, M, N) tensor; mask is expanded to x's shape.
// Optional outputs that are not requested come back as empty (0,) tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace lmfast::cpu {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias,
                                                          const std::optional<Tensor>& residual,
                                                          double eps);
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x,
                                                  const std::optional<Tensor>& weight,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const std::optional<Tensor>& dresidual_out,
                                                  bool weight_grad, bool bias_grad);
std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x,
                                                const std::optional<Tensor>& weight,
                                                const std::optional<Tensor>& residual,
                                                double eps);
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x,
                                        const std::optional<Tensor>& weight, const Tensor& rstd,
                                        const std::optional<Tensor>& dresidual_out,
                                        bool weight_grad);
Tensor softmax_fwd(const Tensor& x, const std::optional<Tensor>& mask, double scale,
                   bool causal);
Tensor softmax_bwd(const Tensor& dy, const Tensor& y, double scale);

// Attention: q (B, Hq, Sq, D), k, v (B, Hkv, Sk, D); the forward takes any strides with a
// contiguous head dim and returns o in (B, Sq, Hq, D) memory order (o.transpose(1, 2) is
// contiguous), the backward takes contiguous tensors; mask expanded to (B, Hq, Sq, Sk);
// window: none or >= 1. Returns (o, lse) with lse (B, Hq, Sq) in the accumulation dtype; the
// backward returns (dq, dk, dv, dmask or an empty tensor).
std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const std::optional<Tensor>& mask, double scale,
                                         bool causal, std::optional<int64_t> window);
std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
    const Tensor& lse, const std::optional<Tensor>& dlse, const std::optional<Tensor>& mask,
    double scale, bool causal, std::optional<int64_t> window, bool mask_grad);

// "torch=<version the extension was built against>;isa=<AVX512|AVX2|DEFAULT>;openmp=<0|1>"
std::string build_info();

}  // namespace lmfast::cpu
