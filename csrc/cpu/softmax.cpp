// Softmax over the last dim with fused scale, additive/boolean mask and causal masking, on
// the CPU. x is viewed as (B, H, M, N); for a row (b, h, m):
//
//   z_j = scale * x_j + mask[b, h, m, j]      (boolean mask: z_j = -inf where mask is False)
//   z_j = -inf for j > N - M + m              (causal, bottom-right aligned)
//   y_j = exp(z_j - max z) / sum_k exp(z_k - max z)      fully masked row -> y = 0
//
//   backward: dx_j = scale * y_j * (dy_j - sum_k y_k dy_k)
//
// The mask is read through strides, so a broadcast mask (stride 0) is never materialized.
// exp(z - max) is kept in a float row buffer (the output row itself for float32), so 16-bit
// outputs are rounded once.
#include "vec.h"  // first: selects the vector ISA

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../ops.h"

namespace lmfast::cpu {
namespace {

using at::Tensor;

// Where one row's mask values live: mask_t is scalar_t (additive) or bool (True = keep).
template <typename mask_t>
struct MaskRow {
  const mask_t* ptr = nullptr;  // nullptr: no mask
  int64_t col_stride = 1;       // 0 (one value for the whole row) or 1
};

template <typename scalar_t, typename mask_t>
void softmax_fwd_kernel(const scalar_t* x, scalar_t* y, const mask_t* mask,
                        const int64_t mask_strides[4], int64_t H, int64_t M, int64_t rows,
                        int64_t N, double scale, bool causal) {
  using C = Chunk<scalar_t>;
  using Vec = typename C::Vec;
  using acc_t = typename C::acc_t;
  constexpr int64_t K = C::kChunk;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr bool kBoolMask = std::is_same_v<mask_t, bool>;

  // Every pass loads and stores in Chunk's paired order (cheaper for bfloat16): the row's max
  // and sum do not care which lane holds which element, the exp buffer keeps each chunk's lanes
  // as they are (whole vectors: the buffer is rounded up to whole chunks), and the boolean
  // mask's staging lanes are laid out in the same order.
  const int64_t scratch_len = C::kReduced ? (N + K - 1) / K * K : 0;
  at::parallel_for(0, rows, row_grain(N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(scratch_len);
    alignas(64) acc_t mask_tmp[K] = {};
    for (int64_t row = begin; row < end; ++row) {
      const int64_t m = row % M, h = (row / M) % H, b = row / (M * H);
      const scalar_t* xi = x + row * N;
      scalar_t* yi = y + row * N;
      acc_t* z = C::kReduced ? scratch.data() : reinterpret_cast<acc_t*>(yi);
      const int64_t valid = causal ? std::clamp<int64_t>(N - M + m + 1, 0, N) : N;
      MaskRow<mask_t> mrow;
      if (mask != nullptr) {
        mrow.ptr = mask + b * mask_strides[0] + h * mask_strides[1] + m * mask_strides[2];
        mrow.col_stride = mask_strides[3];
      }

      // z = scale * x + mask for one chunk of the valid prefix (computed in passes 1 and 2:
      // cheaper than storing it in pass 1 and reading it back).
      const Vec scale_v(static_cast<acc_t>(scale));
      auto logits = [&](int64_t j, int64_t n) {
        auto c = C::load_paired(xi + j, n);
        c.lo *= scale_v;
        c.hi *= scale_v;
        if (mrow.ptr != nullptr) {
          if constexpr (kBoolMask) {
            // select, not add: a masked-out entry is -inf whatever x holds there (a NaN in a
            // padding position must not reach the row; found by tests/test_fuzz.py)
            for (int64_t t = 0; t < K; ++t) {  // element t's lane (past n: 0, masked out by the caller)
              const bool keep = t < n && mrow.ptr[(j + t) * mrow.col_stride];
              mask_tmp[C::kPaired ? (t % 2) * C::kVec + t / 2 : t] = keep ? acc_t(1) : acc_t(0);
            }
            const auto mk = Chunk<acc_t>::load(mask_tmp, K);
            const Vec zero(0), neg_inf(kNegInf);
            c.lo = Vec::blendv(neg_inf, c.lo, mk.lo != zero);
            c.hi = Vec::blendv(neg_inf, c.hi, mk.hi != zero);
          } else if (mrow.col_stride == 1) {
            const auto mk = C::load_paired(mrow.ptr + j, n);
            c.lo += mk.lo;
            c.hi += mk.hi;
          } else {
            const Vec mk(static_cast<acc_t>(mrow.ptr[0]));
            c.lo += mk;
            c.hi += mk;
          }
        }
        return c;
      };

      // Pass 1: row max.
      Vec max_v(kNegInf);
      for_each_chunk<K>(valid, [&](int64_t j, int64_t n) {
        const auto c = logits(j, n).keep_first_paired(n, kNegInf);
        max_v = at::vec::maximum(max_v, at::vec::maximum(c.lo, c.hi));
      });
      const acc_t row_max = hmax(max_v);

      if (row_max == kNegInf) {  // fully masked (or empty) row: zeros, not NaN
        std::fill(yi, yi + N, scalar_t(0));
        continue;
      }

      // Pass 2: e = exp(z - max) into the float row buffer, and its sum.
      const Vec max_bc(row_max);
      Vec sum_lo(0), sum_hi(0);
      const scalar_t* next_x = row + 1 < end ? xi + N : nullptr;
      for_each_chunk<K>(valid, [&](int64_t j, int64_t n) {
        prefetch_row_chunk(next_x, j, sizeof(scalar_t));
        auto c = logits(j, n);
        c.lo = softmax_exp(c.lo - max_bc);
        c.hi = softmax_exp(c.hi - max_bc);
        if constexpr (C::kReduced) {  // whole vectors into the float buffer
          c.lo.store(z + j);
          c.hi.store(z + j + C::kVec);
        } else {  // z is the output row
          c.store_acc(z + j, n);
        }
        c = c.keep_first_paired(n, 0);
        sum_lo += c.lo;
        sum_hi += c.hi;
      });
      const acc_t inv_sum_s = acc_t(1) / hsum(sum_lo + sum_hi);
      const Vec inv_sum(inv_sum_s);

      // Pass 3: normalize; the masked-off causal tail is zero, or NaN in a NaN row (as the
      // reference's softmax over -inf entries gives, and the Triton kernel; found by the long
      // fuzz profile).
      for_each_chunk<K>(valid, [&](int64_t j, int64_t n) {
        C c;
        if constexpr (C::kReduced) {
          c = C{Vec::loadu(z + j), Vec::loadu(z + j + C::kVec)};
        } else {
          c = C::load_acc(z + j, n);
        }
        c.lo *= inv_sum;
        c.hi *= inv_sum;
        c.store_paired(yi + j, n);
      });
      std::fill(yi + valid, yi + N, std::isnan(inv_sum_s) ? scalar_t(NAN) : scalar_t(0));
    }
  });
}

template <typename scalar_t>
void softmax_bwd_kernel(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t rows,
                        int64_t N, double scale) {
  using C = Chunk<scalar_t>;
  using Vec = typename C::Vec;
  using acc_t = typename C::acc_t;
  constexpr int64_t K = C::kChunk;

  at::parallel_for(0, rows, row_grain(N), [&](int64_t begin, int64_t end) {
    const scalar_t* y_end = y + end * N;  // prefetches stay inside the task's rows
    const scalar_t* dy_end = dy + end * N;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* dyi = dy + row * N;
      const scalar_t* yi = y + row * N;
      // Pass 1 (streams the row in; prefetches 4 KB ahead): dot = sum(y * dy), sum = sum(y),
      // each in two sets of accumulators. Both passes load and store in Chunk's paired order
      // (cheaper for bfloat16; the sums do not care which lane holds which element).
      Vec dot[2][2] = {{Vec(0), Vec(0)}, {Vec(0), Vec(0)}}, sums[2][2] = {{Vec(0), Vec(0)}, {Vec(0), Vec(0)}};
      for_each_chunk_2sets<K>(N, [&](int64_t j, int64_t n, int set) {
        prefetch_ahead(yi, j, sizeof(scalar_t), y_end);
        prefetch_ahead(dyi, j, sizeof(scalar_t), dy_end);
        const auto a = C::load_paired(yi + j, n), g = C::load_paired(dyi + j, n);  // tails load as 0
        dot[set][0] = at::vec::fmadd(a.lo, g.lo, dot[set][0]);
        dot[set][1] = at::vec::fmadd(a.hi, g.hi, dot[set][1]);
        sums[set][0] += a.lo;
        sums[set][1] += a.hi;
      });
      // Pass 2 (in cache; prefetches the next row's dx for writing): dx = y (dy - dot) scale.
      // 16-bit y is renormalized to p = y / sum first: dx = scale p (dy - sum(p dy)) = y (dy
      // sum - dot) scale / sum^2. Rounded to 16 bits, y sums to 1 +- a few ulps, and on a
      // peaked row dy_k - dot, for the dominant y_k ~ 1, is dy_k (1 - y_k) - ...: 1 - y_k's
      // rounding (an ulp of 1: 2^-8 in bfloat16) was amplified into the whole result (found by
      // the long fuzz profile: 7 ulps where eager, whose autograd keeps a float32 y, had 0.3);
      // dy sum - dot = sum_j (dy - dy_j) y_j carries y_j's relative rounding only. float32 y
      // keeps eager's own formula (renormalizing adds roundings and gains nothing there).
      // Either is exact where dy and dot are equal (a width-1 row); a row of zeros (fully
      // masked) gets dx = 0.
      constexpr bool kRenormalize = sizeof(scalar_t) == 2;
      const acc_t sum = kRenormalize ? hsum_sets(sums) : acc_t(1);
      const acc_t coef_s = !kRenormalize ? static_cast<acc_t>(scale)
                           : sum != acc_t(0) ? static_cast<acc_t>(scale) / (sum * sum) : acc_t(0);
      const Vec coef(coef_s), sum_v(sum);
      const Vec dot_v(hsum_sets(dot));
      scalar_t* dxi = dx + row * N;
      scalar_t* next_dx = row + 1 < end ? dxi + N : nullptr;
      for_each_chunk<K>(N, [&](int64_t j, int64_t n) {
        prefetch_row_chunk_for_write(next_dx, j, sizeof(scalar_t));
        auto a = C::load_paired(yi + j, n);
        const auto g = C::load_paired(dyi + j, n);
        if constexpr (kRenormalize) {
          a.lo = a.lo * at::vec::fmsub(g.lo, sum_v, dot_v) * coef;
          a.hi = a.hi * at::vec::fmsub(g.hi, sum_v, dot_v) * coef;
        } else {
          a.lo = a.lo * (g.lo - dot_v) * coef;
          a.hi = a.hi * (g.hi - dot_v) * coef;
        }
        a.store_paired(dxi + j, n);
      });
    }
  });
}

}  // namespace

Tensor softmax_fwd(const Tensor& x, const std::optional<Tensor>& mask, double scale,
                   bool causal) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.device().is_cpu(),
              "lmfast_C: x must be a contiguous 4-D CPU tensor (B, H, M, N)");
  int64_t mask_strides[4] = {0, 0, 0, 0};
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu() && mask->sizes() == x.sizes(),
                "lmfast_C: mask must be a CPU tensor expanded to x's shape ", x.sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == x.scalar_type(),
                "lmfast_C: mask must be bool or have x's dtype ", x.scalar_type());
    // (an empty x has nothing to read: its mask's strides can be anything; found by the long
    // fuzz profile, softmax over dim 2 of a (0, 0, 2, 2) x with a (2, 2) mask)
    TORCH_CHECK(mask->stride(3) == 0 || mask->stride(3) == 1 || mask->size(3) <= 1 || x.numel() == 0,
                "lmfast_C: mask's last stride must be 0 or 1");
    for (int d = 0; d < 4; ++d) mask_strides[d] = mask->size(d) == 1 ? 0 : mask->stride(d);
  }
  Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const int64_t H = x.size(1), M = x.size(2), N = x.size(3), rows = x.numel() / N;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lmfast_softmax_fwd", [&] {
    if (mask.has_value() && mask->scalar_type() == at::kBool) {
      softmax_fwd_kernel<scalar_t, bool>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                         mask->const_data_ptr<bool>(), mask_strides, H, M, rows, N,
                                         scale, causal);
    } else {
      softmax_fwd_kernel<scalar_t, scalar_t>(
          x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
          mask.has_value() ? mask->const_data_ptr<scalar_t>() : nullptr, mask_strides, H, M,
          rows, N, scale, causal);
    }
  });
  return y;
}

Tensor softmax_bwd(const Tensor& dy, const Tensor& y, double scale) {
  TORCH_CHECK(y.dim() >= 1 && y.is_contiguous() && y.device().is_cpu(),
              "lmfast_C: y must be a contiguous CPU tensor (..., N)");
  TORCH_CHECK(dy.sizes() == y.sizes() && dy.is_contiguous() &&
                  dy.scalar_type() == y.scalar_type() && dy.device().is_cpu(),
              "lmfast_C: dy must be a contiguous CPU tensor like y");
  Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  const int64_t N = y.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "lmfast_softmax_bwd", [&] {
    softmax_bwd_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                 dx.data_ptr<scalar_t>(), y.numel() / N, N, scale);
  });
  return dx;
}

}  // namespace lmfast::cpu
