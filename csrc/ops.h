// Entry points of lmfast._C.
//
// Kernel ops (lmfast::cpu: the kernels, compiled per ISA level into kernel libraries; _C
// registers forwarders to them for the CPU key, see lmfast::dispatch below). Launch-level contracts (the public
// ops, in C++ or Python, validate user input first; these only TORCH_CHECK their own
// preconditions):
//   norms:   x is a contiguous (..., N) tensor, normalized over N (the Triton twins take
//            (rows, N)); weight/bias (N,) of x's dtype; mean/rstd hold one value per row,
//            shaped like x's leading dims, in the accumulation dtype (float, or double for
//            double inputs).
//   softmax: the forward's x is a contiguous (B, H, M, N) tensor, its mask expanded to x's
//            shape; the backward's y and dy are contiguous (..., N).
// Optional outputs that are not requested come back as empty (0,) tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
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
                                                  bool weight_grad, bool bias_grad, double eps);
// RMSNorm's scale is weight_offset + weight (1 + weight: Gemma's), added in the accumulation
// type; weight_offset is 0 without a weight.
std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x,
                                                const std::optional<Tensor>& weight,
                                                const std::optional<Tensor>& residual,
                                                double eps, double weight_offset);
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x,
                                        const std::optional<Tensor>& weight, const Tensor& rstd,
                                        const std::optional<Tensor>& dresidual_out,
                                        bool weight_grad, double eps, double weight_offset);
Tensor softmax_fwd(const Tensor& x, const std::optional<Tensor>& mask, double scale,
                   bool causal);
Tensor softmax_bwd(const Tensor& dy, const Tensor& y, double scale);

// Attention: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) (Dv may differ from D:
// DeepSeek's multi-head latent attention); the forward takes any strides with a contiguous head
// dim and returns o in (B, Sq, Hq, Dv) memory order (o.transpose(1, 2) is
// contiguous), the backward takes contiguous tensors; mask expanded to (B, Hq, Sq, Sk);
// window: none or >= 1; dropout_p in [0, 1), dropout_seed an int64 tensor of one element
// (on the CPU for the CPU kernels) where dropout_p > 0 (the mask: lmfast/reference.py's
// dropout_keep); softcap > 0 caps the scaled scores to softcap * tanh(s / softcap) before
// the mask is added (Gemma 2's logit softcapping), 0: none; cu_seqlens_q / cu_seqlens_k (both
// or neither; B = 1) pack documents, each query seeing its own document's keys, causal and
// window applied inside it (csrc/documents.h). Returns (o, lse, row_stats):
// lse (B, Hq, Sq) in the accumulation dtype, without dropout; row_stats (2, B, Hq, Sq) in
// the accumulation dtype, each row's softmax max m ([0]; 0 on a row that sees no key) and
// 1 / l, l = sum of exp(s - m) ([1]; 0 there). The backward takes row_stats in place of lse:
// p = exp(s - m) / l is the unfused softmax's own form, where exp(s - lse) rounds s - lse,
// ~log(keys) further from 0 (the Triton backward, which also serves the CUDA forward, reads
// them; the CPU backward recomputes each row's max and sum from its scores). The backward
// returns (dq, dk, dv, dmask or an empty tensor); dmask (B, Hq, Sq, Sk) is in the accumulation
// dtype, unrounded, for the autograd to sum over the mask's broadcast dims before it rounds
// (rounded first, a float16 sum over queries overflowed to inf - inf = NaN where the float64
// reference's is finite or inf: found by the long fuzz profile).
std::tuple<Tensor, Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const std::optional<Tensor>& mask, double scale,
                                                 bool causal, std::optional<int64_t> window,
                                                 double dropout_p,
                                                 const std::optional<Tensor>& dropout_seed, double softcap,
                                                 const std::optional<Tensor>& cu_seqlens_q,
                                                 const std::optional<Tensor>& cu_seqlens_k);
std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
    const Tensor& row_stats, const std::optional<Tensor>& dlse, const std::optional<Tensor>& mask,
    double scale, bool causal, std::optional<int64_t> window, bool mask_grad, double dropout_p,
    const std::optional<Tensor>& dropout_seed, double softcap, const std::optional<Tensor>& cu_seqlens_q,
    const std::optional<Tensor>& cu_seqlens_k);
// What multiplies bfloat16 attention tiles on this CPU: "amx", "avx512bf16" (oneDNN's brgemm)
// or "sgemm" (tiles widened to float32). The first call runs a small brgemm self-check.
const char* bf16_attention_unit();

}  // namespace lmfast::cpu

// The kernel ops' CPU impls in lmfast._C forward to the kernels of one ISA level's library,
// loaded at run time (csrc/dispatch.cpp; csrc/cpu/kernel_table.h).
namespace lmfast::dispatch {

std::string cpu_levels();                               // "avx512bf16,avx512,avx2,default": what this CPU runs
std::string load_cpu_kernels(const std::string& path);  // -> "level;capability"
std::string loaded_cpu_kernels();                       // "level;capability" or "none;none"
std::string bf16_attention_unit();                      // the loaded library's cpu::bf16_attention_unit()

}  // namespace lmfast::dispatch

// The public ops and the kernel ops' autograd (csrc/api.cpp): device-independent, they call
// the kernel ops above through the dispatcher.
namespace lmfast::api {

using at::Tensor;

// Public ops: check the user's arguments (the Python layer's messages), shape them for the
// kernels and call the kernel ops. The norms return (y, x + residual), or (y, an empty tensor)
// without a residual; attention returns (o, lse), o (B, Hq, Sq, Dv) in (B, Sq, Hq, Dv) memory.
std::tuple<Tensor, Tensor> layer_norm(const Tensor& x, const std::optional<Tensor>& weight,
                                      const std::optional<Tensor>& bias,
                                      const std::optional<Tensor>& residual, double eps);
std::tuple<Tensor, Tensor> rms_norm(const Tensor& x, const std::optional<Tensor>& weight,
                                    const std::optional<Tensor>& residual, double eps,
                                    double weight_offset);
Tensor softmax(const Tensor& x, int64_t dim, double scale, const std::optional<Tensor>& mask,
               bool causal);
std::tuple<Tensor, Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const std::optional<Tensor>& attn_mask, bool causal,
                                     std::optional<double> scale, std::optional<int64_t> window,
                                     double dropout_p, const std::optional<Tensor>& dropout_seed,
                                     std::optional<double> softcap, const std::optional<Tensor>& cu_seqlens_q,
                                     const std::optional<Tensor>& cu_seqlens_k);

// Autograd-key kernels of the *_fwd kernel ops (their backward calls the *_bwd ops).
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_autograd(
    const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& residual, double eps);
std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd_autograd(const Tensor& x,
                                                         const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& residual,
                                                         double eps, double weight_offset);
Tensor softmax_fwd_autograd(const Tensor& x, const std::optional<Tensor>& mask, double scale,
                            bool causal);
std::tuple<Tensor, Tensor, Tensor> attention_fwd_autograd(const Tensor& q, const Tensor& k,
                                                          const Tensor& v,
                                                          const std::optional<Tensor>& mask,
                                                          double scale, bool causal,
                                                          std::optional<int64_t> window,
                                                          double dropout_p,
                                                          const std::optional<Tensor>& dropout_seed,
                                                          double softcap,
                                                          const std::optional<Tensor>& cu_seqlens_q,
                                                          const std::optional<Tensor>& cu_seqlens_k);

}  // namespace lmfast::api
