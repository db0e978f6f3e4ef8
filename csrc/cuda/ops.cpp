// The CUDA kernel ops (ops.h) on tensors: each checks its launch contract, makes its outputs
// on the input's device, and queues the kernels of one .cu file through kernels.h on the
// current stream. Host C++ only: the ATen headers are parsed here once, not by nvcc once per
// .cu file and GPU architecture (kernels.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../document_tables.h"
#include "../dropout_hash.h"
#include "kernels.h"
#include "ops.h"

namespace lmfast::cuda {
namespace {

Dtype dtype_of(const Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16,
                   "backend 'cuda' supports float16, bfloat16 and float32, got ", s);
  return s == at::kFloat ? Dtype::kFloat32 : s == at::kHalf ? Dtype::kFloat16 : Dtype::kBFloat16;
}

// A tensor's data for a kernel: nullptr for an absent (undefined) or empty one.
const void* data(const Tensor& t) { return t.defined() && t.numel() ? t.const_data_ptr() : nullptr; }
void* mutable_data(const Tensor& t) { return t.defined() && t.numel() ? t.data_ptr() : nullptr; }
const void* data(const std::optional<Tensor>& t) { return t ? data(*t) : nullptr; }

// Workspace from PyTorch's caching allocator, on `like`'s device, freed when this goes out of
// scope: after the launches are queued, which the allocator's stream ordering makes safe.
class TensorWorkspace final : public Workspace {
 public:
  explicit TensorWorkspace(const Tensor& like) : options_(like.options().dtype(at::kByte)) {}
  void* allocate(size_t bytes) override {
    held_.push_back(at::empty({int64_t(bytes)}, options_));
    return held_.back().data_ptr();
  }

 private:
  at::TensorOptions options_;
  std::vector<Tensor> held_;
};

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace

// ---- LayerNorm / RMSNorm ---------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias,
                                                          const std::optional<Tensor>& residual, double eps) {
  check_cuda_contiguous("layer_norm_fwd", {&x, weight ? &*weight : nullptr, bias ? &*bias : nullptr,
                                           residual ? &*residual : nullptr});
  const Dtype dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x), s = residual ? at::empty_like(x) : x.new_empty({0});
  auto stats = x.options().dtype(at::kFloat);
  auto lead = x.sizes().slice(0, x.dim() - 1);
  Tensor mean = at::zeros(lead, stats), rstd = at::zeros(lead, stats);
  const int64_t N = x.size(-1);
  launch_norm_fwd({dtype, /*centered=*/true, data(x), data(residual), data(weight), data(bias), mutable_data(y),
                   mutable_data(s), static_cast<float*>(mutable_data(mean)), static_cast<float*>(mutable_data(rstd)),
                   N ? x.numel() / N : 0, N, eps, 0.0},
                  current_stream());
  return {y, s, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x,
                                                  const std::optional<Tensor>& weight, const Tensor& mean,
                                                  const Tensor& rstd, const std::optional<Tensor>& dres,
                                                  bool weight_grad, bool bias_grad, double eps) {
  check_cuda_contiguous("layer_norm_bwd", {&dy, &x, weight ? &*weight : nullptr, &mean, &rstd,
                                           dres ? &*dres : nullptr});
  const Dtype dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(-1);
  Tensor dx = at::empty_like(x);
  Tensor dw = weight_grad ? at::empty({N}, x.options()) : x.new_empty({0});
  Tensor db = bias_grad ? at::empty({N}, x.options()) : x.new_empty({0});
  TensorWorkspace workspace(x);
  launch_norm_bwd({dtype, /*centered=*/true, data(dy), data(x), data(weight), static_cast<const float*>(data(mean)),
                   static_cast<const float*>(data(rstd)), data(dres), mutable_data(dx), mutable_data(dw),
                   mutable_data(db), N ? x.numel() / N : 0, N, eps, 0.0},
                  workspace, current_stream());
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                                const std::optional<Tensor>& residual, double eps,
                                                double weight_offset) {
  check_cuda_contiguous("rms_norm_fwd", {&x, weight ? &*weight : nullptr, residual ? &*residual : nullptr});
  const Dtype dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x), s = residual ? at::empty_like(x) : x.new_empty({0});
  Tensor rstd = at::zeros(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const int64_t N = x.size(-1);
  launch_norm_fwd({dtype, /*centered=*/false, data(x), data(residual), data(weight), /*bias=*/nullptr,
                   mutable_data(y), mutable_data(s), /*mean=*/nullptr, static_cast<float*>(mutable_data(rstd)),
                   N ? x.numel() / N : 0, N, eps, weight_offset},
                  current_stream());
  return {y, s, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                        const Tensor& rstd, const std::optional<Tensor>& dres, bool weight_grad,
                                        double eps, double weight_offset) {
  check_cuda_contiguous("rms_norm_bwd", {&dy, &x, weight ? &*weight : nullptr, &rstd, dres ? &*dres : nullptr});
  const Dtype dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(-1);
  Tensor dx = at::empty_like(x);
  Tensor dw = weight_grad ? at::empty({N}, x.options()) : x.new_empty({0});
  TensorWorkspace workspace(x);
  launch_norm_bwd({dtype, /*centered=*/false, data(dy), data(x), data(weight), /*mean=*/nullptr,
                   static_cast<const float*>(data(rstd)), data(dres), mutable_data(dx), mutable_data(dw),
                   /*db=*/nullptr, N ? x.numel() / N : 0, N, eps, weight_offset},
                  workspace, current_stream());
  return {dx, dw};
}

// ---- softmax ------------------------------------------------------------------------------

Tensor softmax_fwd(const Tensor& x, const std::optional<Tensor>& mask, double scale, bool causal) {
  check_cuda_contiguous("softmax_fwd", {&x});
  if (mask) check_cuda_contiguous("softmax_fwd", {&x, &*mask}, /*need_contiguous=*/false);
  TORCH_CHECK(x.dim() == 4, "lmfast_C::softmax_fwd (cuda): x must be (B, H, M, N)");
  const Dtype dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  const int64_t H = x.size(1), M = x.size(2), N = x.size(3), rows = x.numel() / std::max<int64_t>(N, 1);
  if (x.numel() == 0) return y;
  MaskStrides ms{0, 0, 0, 0};
  MaskKind kind = kNoMask;
  if (mask) {
    TORCH_CHECK(mask->dim() == 4, "lmfast_C::softmax_fwd (cuda): mask must be expanded to x's shape");
    int64_t* s[4] = {&ms.b, &ms.h, &ms.m, &ms.n};
    for (int d = 0; d < 4; ++d) *s[d] = mask->size(d) == 1 ? 0 : mask->stride(d);
    TORCH_CHECK(ms.n == 0 || ms.n == 1, "lmfast_C::softmax_fwd (cuda): the mask's last dim must have stride 0 or 1");
    kind = mask->scalar_type() == at::kBool ? kBoolMask : kAdditiveMask;
    TORCH_CHECK(kind == kBoolMask || mask->scalar_type() == x.scalar_type(),
                "lmfast_C::softmax_fwd (cuda): an additive mask must have x's dtype");
  }
  // (a mask's data pointer as is: a broadcast mask of one element still has one)
  launch_softmax_fwd({dtype, x.const_data_ptr(), mask ? mask->const_data_ptr() : nullptr, kind, ms, y.data_ptr(), H,
                      M, rows, N, float(scale), causal},
                     current_stream());
  return y;
}

Tensor softmax_bwd(const Tensor& dy, const Tensor& y, double scale) {
  check_cuda_contiguous("softmax_bwd", {&dy, &y});
  TORCH_CHECK(dy.sizes() == y.sizes(), "lmfast_C::softmax_bwd (cuda): dy and y must have one shape");
  const Dtype dtype = dtype_of(y);
  const c10::cuda::CUDAGuard guard(y.device());
  Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  const int64_t N = y.size(-1);
  launch_softmax_bwd({dtype, dy.const_data_ptr(), y.const_data_ptr(), dx.data_ptr(), y.numel() / N, N, float(scale)},
                     current_stream());
  return dx;
}

// ---- attention forward -------------------------------------------------------------------

Tensor document_bands(const Tensor& cu_q, const Tensor& cu_k, int64_t Sq, int64_t Sk, bool causal,
                      std::optional<int64_t> window) {
  const int64_t n_docs = cu_q.numel() - 1;
  TORCH_CHECK_VALUE(n_docs >= 1 || Sq == 0, "cu_seqlens_q holds no document but q has ", Sq, " rows");
  TORCH_CHECK(cu_k.numel() == n_docs + 1, "lmfast cuda attention: cu_seqlens_q and cu_seqlens_k differ in length");
  for (const Tensor* cu : {&cu_q, &cu_k})
    TORCH_CHECK(cu->scalar_type() == at::kInt || cu->scalar_type() == at::kLong,
                "lmfast cuda attention: cu_seqlens must be int32 or int64, got ", cu->scalar_type());
  Tensor bands = at::empty({2 * Sq + n_docs + 2}, cu_q.options().dtype(at::kInt));
  launch_document_bands(cu_q.const_data_ptr(), cu_q.scalar_type() == at::kInt, cu_q.stride(0), cu_k.const_data_ptr(),
                        cu_k.scalar_type() == at::kInt, cu_k.stride(0), n_docs, Sq, Sk, causal,
                        documents::window_for_bands(window, Sk), bands.data_ptr<int>(), current_stream());
  return bands;
}

std::tuple<Tensor, Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const std::optional<Tensor>& mask, double scale, bool causal,
                                                 std::optional<int64_t> window, double dropout_p,
                                                 const std::optional<Tensor>& dropout_seed, double softcap,
                                                 const std::optional<Tensor>& cu_seqlens_q,
                                                 const std::optional<Tensor>& cu_seqlens_k) {
  check_cuda_contiguous("attention_fwd",
                        {&q, &k, &v, mask ? &*mask : nullptr, cu_seqlens_q ? &*cu_seqlens_q : nullptr,
                         cu_seqlens_k ? &*cu_seqlens_k : nullptr},
                        /*need_contiguous=*/false);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "lmfast_C::attention_fwd (cuda): dropout_p must be in [0, 1)");
  TORCH_CHECK(dropout_p == 0 || (dropout_seed && dropout_seed->device() == q.device() &&
                                 dropout_seed->scalar_type() == at::kLong && dropout_seed->numel() == 1),
              "lmfast_C::attention_fwd (cuda): dropout_p > 0 needs dropout_seed, an int64 tensor of one element "
              "on q's device");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "lmfast_C::attention_fwd (cuda): 4-D q, k, v");
  const Dtype dtype = dtype_of(q);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Sk = k.size(2);
  const int64_t Dv = v.size(3);
  TORCH_CHECK_VALUE(std::max(D, Dv) <= 256, "backend 'cuda' attention supports head dims up to 256, got ",
                    std::max(D, Dv), "; use backend='triton' or 'torch'");
  for (const Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1,
                "lmfast_C::attention_fwd (cuda): the head dim must be contiguous");
  TORCH_CHECK(std::max({B * Hq * Sq, B * Hkv * Sk, Sk + Sq}) < (int64_t(1) << 31),
              "lmfast_C::attention_fwd (cuda): sizes past 2^31 rows");
  const c10::cuda::CUDAGuard guard(q.device());
  // o in (B, Sq, Hq, Dv) memory, seen as (B, Hq, Sq, Dv)
  Tensor o = at::empty({B, Sq, Hq, Dv}, q.options()).transpose(1, 2);
  Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  Tensor row_stats = at::empty({2, B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (B * Hq * Sq == 0) return {o, lse, row_stats};
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value() && (!cu_seqlens_q || B == 1),
              "lmfast_C::attention_fwd (cuda): cu_seqlens_q and cu_seqlens_k go together, with a batch size of 1");
  Tensor doc_bands;  // int32 on q's device: the rows' bands, cu_seqlens_q, the values' check (document_bands)
  if (cu_seqlens_q) {
    if (cu_seqlens_q->is_cpu()) {  // (the host emulator's tensors: the CPU kernels' checks and ValueErrors)
      documents::check_boundaries("cu_seqlens_q", documents::read_boundaries(*cu_seqlens_q), Sq, true);
      documents::check_boundaries("cu_seqlens_k", documents::read_boundaries(*cu_seqlens_k), Sk, false);
    }
    doc_bands = document_bands(*cu_seqlens_q, *cu_seqlens_k, Sq, Sk, causal, window);
    at::_assert_async(doc_bands.select(0, -1), "cu_seqlens_q and cu_seqlens_k must start at 0, not decrease, "
                                                   "and end at the query and key counts");
  }
  if (Sk == 0) {  // no keys: every row is fully masked
    o.zero_();
    lse.fill_(-INFINITY);
    row_stats.zero_();  // (m = 0, 1 / l = 0)
    return {o, lse, row_stats};
  }

  AttnParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.row_stats = row_stats.data_ptr<float>();
  for (int d = 0; d < 3; ++d) {
    p.q_strides[d] = q.stride(d);
    p.k_strides[d] = k.stride(d);
    p.v_strides[d] = v.stride(d);
  }
  p.mask_kind = kNoMask;
  if (mask) {
    TORCH_CHECK(mask->dim() == 4, "lmfast_C::attention_fwd (cuda): mask must be expanded to (B, Hq, Sq, Sk)");
    p.mask = mask->const_data_ptr();
    p.mask_kind = mask->scalar_type() == at::kBool ? kBoolMask : kAdditiveMask;
    TORCH_CHECK(p.mask_kind == kBoolMask || mask->scalar_type() == q.scalar_type(),
                "lmfast_C::attention_fwd (cuda): an additive mask must have q's dtype");
    for (int d = 0; d < 4; ++d) p.mask_strides[d] = mask->size(d) == 1 ? 0 : mask->stride(d);
  }
  p.B = int(B), p.Hq = int(Hq), p.Hkv = int(Hkv), p.Sq = int(Sq), p.Sk = int(Sk), p.D = int(D), p.Dv = int(Dv);
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.causal = causal;
  p.window = window.has_value() ? int(std::min<int64_t>(*window, Sk + 1)) : 0;  // (>= Sk + 1: no limit)
  p.doc_bands = doc_bands.defined() ? doc_bands.const_data_ptr<int>() : nullptr;
  p.n_docs = cu_seqlens_q ? int(cu_seqlens_q->numel() - 1) : 0;
  p.dropout_seed = dropout_p > 0 ? dropout_seed->const_data_ptr<int64_t>() : nullptr;
  p.drop_threshold = dropout::keep_threshold(dropout_p);
  p.keep_scale = float(1.0 / (1.0 - dropout_p));

  const int64_t elem = q.element_size();
  auto aligned = [&](const Tensor& t) {
    if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16) return false;
    for (int d = 0; d < 3; ++d)
      if ((t.stride(d) * elem) % 16) return false;
    return true;
  };
  const bool vec16 = (D * elem) % 16 == 0 && (Dv * elem) % 16 == 0 && aligned(q) && aligned(k) && aligned(v);
  TensorWorkspace workspace(q);
  launch_attention_fwd(p, dtype, vec16, workspace, current_stream());
  return {o, lse, row_stats};
}

}  // namespace lmfast::cuda
