// LayerNorm and RMSNorm over the last dim, forward and backward, on the CPU.
//
// RMSNorm is LayerNorm without centering (mean fixed at 0, no bias), so both share one
// kernel templated on kCentered. Per row of N elements, with s = x (+ residual):
//
//   forward:   mu   = mean(s)              (0 for RMSNorm)
//              rstd = 1 / sqrt(mean((s - mu)^2) + eps)
//              y    = (s - mu) * rstd * w + b,   w = weight_offset + weight  (offset: RMSNorm only)
//   backward:  xhat = (s - mu) * rstd,  g = dy * w
//              ds   = rstd * (g - mean(g) - xhat * mean(g * xhat))   (mean(g) term: LN only)
//              dw   = sum_rows(dy * xhat),  db = sum_rows(dy)
//
// Each row is read from memory once and then revisited in cache (rows up to ~L2 size), the
// variance is two-pass (exact for any mean), accumulation is in float (double for double).
#include "vec.h"  // first: selects the vector ISA

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../ops.h"

namespace lmfast::cpu {
namespace {

using at::Tensor;

template <typename T>
const T* ptr_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// The backward sums dweight / dbias over rows in contiguous blocks fixed by the shape alone,
// never by the thread count, so the gradients are the same bits whatever torch.set_num_threads
// says (with one block per thread, as before, they were not). Blocks of at least kMinBlockRows
// rows, at most kMaxBlocks of them (192 = 2^6 x 3 spreads evenly over 1, 2, 3, 4, 6, 8, 12, 16,
// 24, 32, 48, 64 or 96 threads), and at most kMaxTotalsBytes of float64 per-block totals
// (or 4 blocks, for rows so wide that 4 blocks' totals exceed it).
constexpr int64_t kMinBlockRows = 32, kMaxBlocks = 192, kMaxTotalsBytes = int64_t{8} << 20;

int64_t num_row_blocks(int64_t rows, int64_t N, int64_t sums) {
  const int64_t by_rows = (rows + kMinBlockRows - 1) / kMinBlockRows;
  const int64_t by_memory = kMaxTotalsBytes / std::max<int64_t>(1, N * sums * int64_t(sizeof(double)));
  return std::max<int64_t>(1, std::min({by_rows, kMaxBlocks, std::max<int64_t>(by_memory, 4)}));
}

// A block's dweight / dbias is summed per group of kBwdBlockRows rows in acc_t registers (see
// norm_bwd_kernel), each group's sum then added into the block's float64 total (the first
// group assigns: totals start uninitialized). Summing any number of rows then rounds no more
// than an 8-row sum does, like torch's cascade sum (a plain running float sum over a 22-row
// block had 35x eager's error on a width-1 weight gradient), while most of the work stays in
// the cheap float adds. The sums are in Chunk's paired order and so are the totals, each
// chunk's lanes laid out as Chunk::paired_slot says; sum_blocks puts them back in order.
template <typename scalar_t>
inline void add_to_total(double* total, int64_t n, const Chunk<scalar_t>& sum, bool first) {
  using C = Chunk<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  alignas(64) acc_t lanes[C::kChunk];
  sum.store_acc(lanes, C::kChunk);
  if (C::kPaired && n < C::kChunk) {  // a row's last chunk: hi's lanes right after lo's
    std::copy(lanes + C::kVec, lanes + C::kVec + n / 2, lanes + (n + 1) / 2);
  }
  if (first) {  // (two loops, each vectorized: n is the constant chunk size but at a row's end)
    for (int64_t t = 0; t < n; ++t) total[t] = double(lanes[t]);
  } else {
    for (int64_t t = 0; t < n; ++t) total[t] += double(lanes[t]);
  }
}

// Runs fn(block, begin, end) for each of `blocks` contiguous row ranges, in parallel. Results
// do not depend on how the thread pool schedules the blocks.
template <typename F>
void for_each_row_block(int64_t rows, int64_t blocks, const F& fn) {
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b, rows * b / blocks, rows * (b + 1) / blocks);
  });
}

// The scale of a weighted norm is weight_offset + weight, added in the accumulation type
// (weight_offset = 1: the zero-centered weight of Gemma's RMSNorm, which adds it in float32).
// nullopt for offset 0: the weight is used as it is, so that w + 0 cannot turn a -0 weight
// into +0 and the kernels give the bits they gave before the offset existed.
template <typename scalar_t>
std::optional<Vectorized<at::opmath_type<scalar_t>>> weight_offset_vec(double weight_offset) {
  if (weight_offset == 0) return std::nullopt;
  return Vectorized<at::opmath_type<scalar_t>>(static_cast<at::opmath_type<scalar_t>>(weight_offset));
}

// A chunk of the weight plus its offset, in Chunk's paired order.
template <typename scalar_t>
inline Chunk<scalar_t> load_weight(const scalar_t* w, int64_t n,
                                   const std::optional<Vectorized<at::opmath_type<scalar_t>>>& offset) {
  auto c = Chunk<scalar_t>::load_paired(w, n);
  if (offset) {
    c.lo += *offset;
    c.hi += *offset;
  }
  return c;
}

// acc += the chunk's values (kSquares: their squares), lane by lane.
template <bool kSquares, typename C>
inline void add_sum(typename C::Vec (&acc)[2], const C& c) {
  if constexpr (kSquares) {
    acc[0] = at::vec::fmadd(c.lo, c.lo, acc[0]);
    acc[1] = at::vec::fmadd(c.hi, c.hi, acc[1]);
  } else {
    acc[0] += c.lo;
    acc[1] += c.hi;
  }
}

template <typename scalar_t, bool kCentered>
void norm_fwd_kernel(const scalar_t* x, const scalar_t* residual, const scalar_t* weight,
                     const scalar_t* bias, scalar_t* y, scalar_t* residual_out,
                     at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* rstd_out,
                     int64_t rows, int64_t N, double eps, double weight_offset) {
  using C = Chunk<scalar_t>;
  using Vec = typename C::Vec;
  using acc_t = typename C::acc_t;
  constexpr int64_t K = C::kChunk;
  const std::optional<Vec> offset_v = weight_offset_vec<scalar_t>(weight_offset);
  // Every pass loads and stores in Chunk's paired order: the statistics are sums, and the
  // output pass reads the weight and bias in that same order. (The weight and bias converted
  // to float once per call, rather than per row, were slower: twice the bytes, and with a row
  // of input and one of output no longer all in L1.)

  at::parallel_for(0, rows, row_grain(N), [&](int64_t begin, int64_t end) {
    // Locals, not the closure's references: the compiler then keeps them in registers rather
    // than reloading them after every store (which, as far as it knows, may change them).
    const scalar_t *const x_ = x, *const residual_ = residual;
    scalar_t *const y_ = y, *const residual_out_ = residual_out;
    const scalar_t *const w_ = weight, *const b_ = bias;
    const int64_t N_ = N;
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* s = x_ + i * N_;  // the row being normalized
      const bool has_next = i + 1 < end;
      const scalar_t* next_x = has_next ? x_ + (i + 1) * N_ : nullptr;
      const scalar_t* next_r = has_next && residual_ ? residual_ + (i + 1) * N_ : nullptr;
      scalar_t* next_y = has_next ? y_ + (i + 1) * N_ : nullptr;

      // The first pass over the row sums s (LayerNorm) or s^2 (RMSNorm: its only statistic),
      // in two sets of accumulators. With a residual it is the pass that forms
      // s = x + residual, rounded to scalar_t exactly as eager `x + residual` would be, and it
      // sums the rounded values, the ones normalized (one pass fewer than summing them after).
      // The pass that completes the statistics prefetches the next row's inputs: this one for
      // RMSNorm, the next one for LayerNorm.
      const scalar_t* prefetch_x = kCentered ? nullptr : next_x;
      const scalar_t* prefetch_r = kCentered ? nullptr : next_r;
      acc_t first_sum;
      // (Each loop has its own accumulators: one array shared by both loops stayed in memory.)
      if (residual_ != nullptr) {
        scalar_t* s_out = residual_out_ + i * N_;
        const scalar_t* r = residual_ + i * N_;
        Vec acc[2][2] = {{Vec(0), Vec(0)}, {Vec(0), Vec(0)}};
        for_each_chunk_2sets<K>(N_, [&](int64_t j, int64_t n, int set) {
          prefetch_row_chunk(prefetch_x, j, sizeof(scalar_t));
          prefetch_row_chunk(prefetch_r, j, sizeof(scalar_t));
          auto a = C::load_paired(s + j, n);
          const auto b = C::load_paired(r + j, n);
          a.lo += b.lo;
          a.hi += b.hi;
          add_sum<!kCentered>(acc[set], a.store_paired_rounded(s_out + j, n));
        });
        first_sum = hsum_sets(acc);
        s = s_out;
      } else {
        Vec acc[2][2] = {{Vec(0), Vec(0)}, {Vec(0), Vec(0)}};
        for_each_chunk_2sets<K>(N_, [&](int64_t j, int64_t n, int set) {
          prefetch_row_chunk(prefetch_x, j, sizeof(scalar_t));
          add_sum<!kCentered>(acc[set], C::load_paired(s + j, n));  // tail lanes load as 0
        });
        first_sum = hsum_sets(acc);
      }

      // LayerNorm's mean and variance by the corrected two-pass algorithm: m0 = mean(s), then
      // one pass over d = s - m0 (in cache) gives sum(d) and sum(d^2); mu = m0 + mean(d) is
      // accurate to ~eps * std rather than eps * |mean|, and var = mean(d^2) - mean(d)^2 has
      // no cancellation since mean(d) is tiny.
      acc_t mean_d = 0, sum_sq = first_sum;
      const acc_t m0 = kCentered ? first_sum / acc_t(N_) : acc_t(0);
      if constexpr (kCentered) {
        const Vec m0_v(m0);
        Vec d[2][2] = {{Vec(0), Vec(0)}, {Vec(0), Vec(0)}}, sq[2][2] = {{Vec(0), Vec(0)}, {Vec(0), Vec(0)}};
        for_each_chunk_2sets<K>(N_, [&](int64_t j, int64_t n, int set) {
          prefetch_row_chunk(next_x, j, sizeof(scalar_t));
          prefetch_row_chunk(next_r, j, sizeof(scalar_t));
          auto c = C::load_paired(s + j, n);
          c.lo -= m0_v;
          c.hi -= m0_v;
          c = c.keep_first_paired(n, 0);
          d[set][0] += c.lo;
          d[set][1] += c.hi;
          sq[set][0] = at::vec::fmadd(c.lo, c.lo, sq[set][0]);
          sq[set][1] = at::vec::fmadd(c.hi, c.hi, sq[set][1]);
        });
        mean_d = hsum_sets(d) / acc_t(N_);
        sum_sq = hsum_sets(sq);
      }
      const acc_t mu = m0 + mean_d;
      // Where d^2 overflows (|s| ~ 1e19 and up in float) both terms can be inf: the variance is
      // then inf (rstd 0), not inf - inf = NaN. A NaN input keeps it NaN. (The Triton twin's
      // NaN read as 0 gave y ~ 1e32: found by tests/test_fuzz.py.)
      const acc_t var = sum_sq == std::numeric_limits<acc_t>::infinity()
                            ? sum_sq
                            : std::max(sum_sq / acc_t(N_) - mean_d * mean_d, acc_t(0));
      const acc_t rstd = acc_t(1) / std::sqrt(var + acc_t(eps));
      if (mean_out != nullptr) mean_out[i] = mu;
      rstd_out[i] = rstd;

      // y = (s - mu) * rstd * w + b. Subtract first: x * rstd - mu * rstd would lose the exact
      // cancellation of s - mu (error ~ eps * |mu| / std when |mu| >> std).
      const Vec mu_v(mu), rstd_v(rstd);
      scalar_t* yi = y_ + i * N_;
      for_each_chunk<K>(N_, [&](int64_t j, int64_t n) {
        prefetch_row_chunk_for_write(next_y, j, sizeof(scalar_t));
        auto c = C::load_paired(s + j, n);
        c.lo = (c.lo - mu_v) * rstd_v;
        c.hi = (c.hi - mu_v) * rstd_v;
        if (w_ != nullptr && b_ != nullptr) {
          const auto w = load_weight<scalar_t>(w_ + j, n, offset_v), b = C::load_paired(b_ + j, n);
          c.lo = at::vec::fmadd(c.lo, w.lo, b.lo);
          c.hi = at::vec::fmadd(c.hi, w.hi, b.hi);
        } else if (w_ != nullptr) {
          const auto w = load_weight<scalar_t>(w_ + j, n, offset_v);
          c.lo *= w.lo;
          c.hi *= w.hi;
        } else if (b_ != nullptr) {
          const auto b = C::load_paired(b_ + j, n);
          c.lo += b.lo;
          c.hi += b.hi;
        }
        c.store_paired(yi + j, n);
      });
    }
  });
}

// Rows per group of the backward's second pass, which walks a group's rows chunk by chunk:
// each chunk's dweight / dbias contribution of the group is summed in registers and added to
// the float64 totals once (add_to_total). A group's rows stay in L2: 8 rows of 16-bit values,
// 4 of wider ones (2 x 8 x 8 KB, 2 x 4 x 16 KB at N = 4096; 8 float32 rows measured slower).
// (Groups of 4 rows summed into a float row buffer, flushed to float64 every 8 rows: the
// bfloat16 LayerNorm backward at 1024 x 4096 took 0.68 ms that way, 0.57 ms this way.)
template <typename scalar_t>
constexpr int64_t kBwdBlockRows = sizeof(scalar_t) == 2 ? 8 : 4;

template <typename scalar_t, bool kCentered>
void norm_bwd_kernel(const scalar_t* dy, const scalar_t* x, const scalar_t* weight,
                     const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
                     const scalar_t* dresidual_out, scalar_t* dx,
                     double* dweight_total, double* dbias_total, int64_t rows, int64_t N,
                     int64_t blocks, double weight_offset) {
  using C = Chunk<scalar_t>;
  using Vec = typename C::Vec;
  using acc_t = typename C::acc_t;
  constexpr int64_t K = C::kChunk, R = kBwdBlockRows<scalar_t>;
  const std::optional<Vec> offset_v = weight_offset_vec<scalar_t>(weight_offset);

  // Every load and store is in Chunk's paired order (so are the dweight / dbias totals).
  for_each_row_block(rows, blocks, [&](int64_t block, int64_t begin, int64_t end) {
    // Locals, not the closure's references, so that stores cannot make the compiler reload them.
    const scalar_t *const x_ = x, *const dy_ = dy, *const w_ = weight, *const dres_ = dresidual_out;
    scalar_t* const dx_ = dx;
    const int64_t N_ = N;
    double* dw_total = dweight_total ? dweight_total + block * N_ : nullptr;  // this block's dweight / dbias
    double* db_total = dbias_total ? dbias_total + block * N_ : nullptr;
    const scalar_t* x_end = x_ + end * N_;  // prefetches stay inside the task's rows
    const scalar_t* dy_end = dy_ + end * N_;
    for (int64_t i0 = begin; i0 < end; i0 += R) {
      const int64_t nr = std::min(R, end - i0);
      Vec mu_v[R], rstd_v[R], c1[R], c2[R];  // per row: xhat = (x - mu) * rstd, and the two means

      // Pass 1, per row (streamed from memory): c1 = mean(g * xhat), c2 = mean(g), g = dy * w.
      // Tail lanes of x and dy load as zero, so g = 0 there. Two sets of accumulators.
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = i0 + r;
        const scalar_t* xi = x_ + i * N_;
        const scalar_t* dyi = dy_ + i * N_;
        mu_v[r] = Vec(kCentered ? mean[i] : acc_t(0));
        rstd_v[r] = Vec(rstd[i]);
        const Vec mu = mu_v[r], rs = rstd_v[r];
        Vec gx[2][2] = {{Vec(0), Vec(0)}, {Vec(0), Vec(0)}}, gs[2][2] = {{Vec(0), Vec(0)}, {Vec(0), Vec(0)}};
        for_each_chunk_2sets<K>(N_, [&](int64_t j, int64_t n, int set) {
          prefetch_ahead(xi, j, sizeof(scalar_t), x_end);
          prefetch_ahead(dyi, j, sizeof(scalar_t), dy_end);
          auto xh = C::load_paired(xi + j, n), g = C::load_paired(dyi + j, n);
          xh.lo = (xh.lo - mu) * rs;
          xh.hi = (xh.hi - mu) * rs;
          if (w_ != nullptr) {
            const auto w = load_weight<scalar_t>(w_ + j, n, offset_v);
            g.lo *= w.lo;
            g.hi *= w.hi;
          }
          gx[set][0] = at::vec::fmadd(g.lo, xh.lo, gx[set][0]);
          gx[set][1] = at::vec::fmadd(g.hi, xh.hi, gx[set][1]);
          if constexpr (kCentered) {
            gs[set][0] += g.lo;
            gs[set][1] += g.hi;
          }
        });
        c1[r] = Vec(hsum_sets(gx) / acc_t(N_));
        c2[r] = Vec(kCentered ? hsum_sets(gs) / acc_t(N_) : acc_t(0));
      }

      // Pass 2, chunk by chunk over the group's rows (in cache): dx = (g - xhat * c1 - c2) *
      // rstd (+ dresidual), and the group's dw / db of the chunk, added to the block's float64
      // totals once. The next group's dx rows are prefetched for writing.
      const bool first = i0 == begin;
      for_each_chunk<K>(N_, [&](int64_t j, int64_t n) {
        const C w = w_ != nullptr ? load_weight<scalar_t>(w_ + j, n, offset_v) : C{Vec(1), Vec(1)};
        C dw_acc{Vec(0), Vec(0)}, db_acc{Vec(0), Vec(0)};
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = i0 + r;
          if (i + R < end) prefetch_row_chunk_for_write(dx_ + (i + R) * N_, j, sizeof(scalar_t));
          auto xh = C::load_paired(x_ + i * N_ + j, n);
          const auto d = C::load_paired(dy_ + i * N_ + j, n);
          xh.lo = (xh.lo - mu_v[r]) * rstd_v[r];
          xh.hi = (xh.hi - mu_v[r]) * rstd_v[r];
          C out;  // g = dy * w (w = 1 without a weight)
          out.lo = at::vec::fnmadd(xh.lo, c1[r], d.lo * w.lo - c2[r]) * rstd_v[r];
          out.hi = at::vec::fnmadd(xh.hi, c1[r], d.hi * w.hi - c2[r]) * rstd_v[r];
          if (dres_ != nullptr) {  // gradient flowing into the residual-sum output
            const auto res = C::load_paired(dres_ + i * N_ + j, n);
            out.lo += res.lo;
            out.hi += res.hi;
          }
          out.store_paired(dx_ + i * N_ + j, n);
          dw_acc.lo = at::vec::fmadd(d.lo, xh.lo, dw_acc.lo);
          dw_acc.hi = at::vec::fmadd(d.hi, xh.hi, dw_acc.hi);
          db_acc.lo += d.lo;
          db_acc.hi += d.hi;
        }
        if (dw_total) add_to_total(dw_total + j, n, dw_acc, first);
        if (db_total) add_to_total(db_total + j, n, db_acc, first);
      });
    }
  });
}

// Rows of at most kExactRowMax elements. dx = rstd (g - mean(g) - xhat mean(g xhat)) removes
// from g its components along 1 and xhat, which span most of a short row: all of it for
// LayerNorm at N = 2 and RMSNorm at N = 1, where dx ~ eps / (var + eps) is what is left of
// O(|g|) terms that cancel. The float rounding of rstd and xhat is then amplified ~var / eps
// times (found by the long fuzz profile: on single rows the float path had up to 3x eager's
// error, though 0.2-1x eager's over 2M rows; both were wrong in the 2nd-5th digit). So these
// rows recompute their statistics in double and split the sum so that nothing cancels: with
// d = s - mu and p = (d . g) / (d . d) (g's component along d),
//     xhat mean(g xhat) = d p var / (var + eps),   so
//     g - mean(g) - xhat mean(g xhat) = (g - mean(g) - d p) + d p eps / (var + eps),
// where the first term, g with its components along 1 and d removed, is exactly 0 when those
// span the row (LayerNorm at N = 2, RMSNorm at N = 1, var > 0) and O(|g|) otherwise, and the
// second is the small eps term, computed without cancellation. Rounded once to the dtype.
constexpr int64_t kExactRowMax = 8;

template <typename scalar_t, bool kCentered>
void norm_bwd_exact_rows(const scalar_t* dy, const scalar_t* x, const scalar_t* weight,
                         const scalar_t* dresidual_out, scalar_t* dx, double* dweight_total,
                         double* dbias_total, int64_t rows, int64_t N, int64_t blocks, double eps,
                         double weight_offset) {
  for_each_row_block(rows, blocks, [&](int64_t block, int64_t begin, int64_t end) {
    double dw[kExactRowMax] = {}, db[kExactRowMax] = {};  // this block's sums
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xi = x + i * N;
      const scalar_t* dyi = dy + i * N;
      double d[kExactRowMax], g[kExactRowMax];
      double mu = 0, dd = 0, dg = 0, g_mean = 0;
      for (int64_t j = 0; j < N; ++j) mu += kCentered ? double(xi[j]) : 0.0;
      mu /= double(N);
      for (int64_t j = 0; j < N; ++j) {
        d[j] = double(xi[j]) - mu;
        const double w = weight == nullptr ? 1.0 : weight_offset != 0 ? double(weight[j]) + weight_offset
                                                                       : double(weight[j]);
        g[j] = double(dyi[j]) * w;
        dd += d[j] * d[j];
        dg += d[j] * g[j];
        g_mean += g[j];
      }
      g_mean = kCentered ? g_mean / double(N) : 0.0;
      const double var = dd / double(N), rstd = 1.0 / std::sqrt(var + eps);
      const double p = dd > 0 ? dg / dd : 0.0;  // (NaN inputs: NaN via rstd and dd)
      const bool spanned = dd > 0 && N == (kCentered ? 2 : 1);
      const double eps_share = eps / (var + eps);
      for (int64_t j = 0; j < N; ++j) {
        const double removed = spanned ? 0.0 : g[j] - g_mean - d[j] * p;
        double out = rstd * (removed + d[j] * p * eps_share);
        if (dresidual_out != nullptr) out += double(dresidual_out[i * N + j]);
        dx[i * N + j] = static_cast<scalar_t>(out);
        dw[j] += double(dyi[j]) * d[j] * rstd;
        db[j] += double(dyi[j]);
      }
    }
    for (int64_t j = 0; j < N; ++j) {
      if (dweight_total != nullptr) dweight_total[block * N + j] = dw[j];
      if (dbias_total != nullptr) dbias_total[block * N + j] = db[j];
    }
  });
}

void check_like_x(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device().is_cpu(), "lmfast_C: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lmfast_C: ", name, " must have dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes() && t.is_contiguous(), "lmfast_C: ", name,
              " must be a contiguous tensor of shape ", x.sizes());
}

void check_param(const std::optional<Tensor>& t, const char* name, const Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type() && t->dim() == 1 &&
                  t->size(0) == x.size(-1) && t->is_contiguous(),
              "lmfast_C: ", name, " must be a contiguous CPU tensor of shape (", x.size(-1),
              ",) and dtype ", x.scalar_type());
}

// x is a contiguous (..., N) tensor: its rows are the product of the leading dims.
int64_t check_rows_of(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && x.device().is_cpu(),
              "lmfast_C: x must be a contiguous CPU tensor (..., N)");
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

template <bool kCentered>
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x,
                                                    const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias,
                                                    const std::optional<Tensor>& residual,
                                                    double eps, double weight_offset) {
  const int64_t rows = check_rows_of(x), N = x.size(-1);
  if (residual.has_value()) check_like_x(*residual, "residual", x);
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  // mean, rstd: one per row, shaped like x's leading dims
  const auto stat_opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  const auto stat_shape = x.sizes().slice(0, x.dim() - 1);
  Tensor y = at::empty_like(x);
  Tensor residual_out = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor mean = kCentered ? at::empty(stat_shape, stat_opts) : at::empty({0}, stat_opts);
  Tensor rstd = at::empty(stat_shape, stat_opts);
  if (rows == 0) return {y, residual_out, mean, rstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lmfast_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    norm_fwd_kernel<scalar_t, kCentered>(
        x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(residual),
        ptr_or_null<scalar_t>(weight), ptr_or_null<scalar_t>(bias), y.data_ptr<scalar_t>(),
        residual.has_value() ? residual_out.data_ptr<scalar_t>() : nullptr,
        kCentered ? mean.data_ptr<acc_t>() : nullptr, rstd.data_ptr<acc_t>(), rows, N, eps, weight_offset);
  });
  return {y, residual_out, mean, rstd};
}

// Scratch for the backward's per-block totals: up to kMaxTotalsBytes, kept by the calling thread
// between calls (a fresh ~1 MiB allocation came with fresh pages from the OS every call); the
// rare larger one (4 blocks of very wide rows) lives in `oversize`, the caller's.
double* totals_scratch(int64_t count, std::vector<double>& oversize) {
  if (count * int64_t(sizeof(double)) > kMaxTotalsBytes) {
    oversize.resize(count);
    return oversize.data();
  }
  thread_local std::vector<double> kept;
  if (int64_t(kept.size()) < count) kept.resize(count);
  return kept.data();
}

// out[j] = sum over blocks of totals[block * N + j], in block order, rounded once to scalar_t
// (0 without rows: totals is null then). Accumulated into block 0's row a block at a time, so
// the adds vectorize over columns (summing one column's blocks at a time was a chain of
// dependent adds: 0.5 ms for 192 blocks at N = 1024); columns are split over threads.
// `paired`: each chunk's totals are in Chunk's paired order (norm_bwd_kernel's; the exact-rows
// kernel's are in element order).
template <typename scalar_t>
void sum_blocks(double* totals, int64_t blocks, int64_t N, bool paired, scalar_t* out) {
  at::parallel_for(0, N, 2048, [&](int64_t j0, int64_t j1) {
    if (totals == nullptr) {
      std::fill(out + j0, out + j1, scalar_t(0));
      return;
    }
    for (int64_t b = 1; b < blocks; ++b) {
      const double* block_total = totals + b * N;
      for (int64_t j = j0; j < j1; ++j) totals[j] += block_total[j];
    }
    if (paired) {  // (j0 is a multiple of 2048, so [j0, j1) holds whole chunks)
      for (int64_t j = j0; j < j1; ++j) out[j] = scalar_t(totals[Chunk<scalar_t>::paired_slot(j, N)]);
    } else {
      for (int64_t j = j0; j < j1; ++j) out[j] = scalar_t(totals[j]);
    }
  });
}

template <bool kCentered>
std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& dy, const Tensor& x,
                                            const std::optional<Tensor>& weight,
                                            const Tensor& mean, const Tensor& rstd,
                                            const std::optional<Tensor>& dresidual_out,
                                            bool weight_grad, bool bias_grad, double eps,
                                            double weight_offset) {
  const int64_t rows = check_rows_of(x), N = x.size(-1);
  check_like_x(dy, "dy", x);
  if (dresidual_out.has_value()) check_like_x(*dresidual_out, "dresidual_out", x);
  check_param(weight, "weight", x);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(rstd.scalar_type() == acc_type && rstd.numel() == rows && rstd.is_contiguous(),
              "lmfast_C: rstd must be a contiguous tensor of one ", acc_type, " per row");
  TORCH_CHECK(!kCentered || (mean.scalar_type() == acc_type && mean.numel() == rows &&
                             mean.is_contiguous()),
              "lmfast_C: mean must be a contiguous tensor of one ", acc_type, " per row");

  // Gradients not asked for are separate empty tensors (custom-op outputs must not alias).
  Tensor dx = at::empty_like(x);
  Tensor dw = at::empty({weight_grad ? N : 0}, x.options());
  Tensor db = at::empty({bias_grad ? N : 0}, x.options());
  const int64_t blocks = num_row_blocks(rows, N, int64_t(weight_grad) + int64_t(bias_grad));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lmfast_norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Per-block float64 totals of the weight/bias gradients (see add_to_total), summed over blocks in
    // block order at the end and rounded once. Every block has rows (blocks <= rows), so the
    // kernel writes every total before it is read.
    const int64_t per_sum = rows > 0 ? blocks * N : 0;
    std::vector<double> oversize;
    double* totals = totals_scratch(per_sum * (int64_t(weight_grad) + int64_t(bias_grad)), oversize);
    double* dw_total = weight_grad && per_sum > 0 ? totals : nullptr;
    double* db_total = bias_grad && per_sum > 0 ? totals + (weight_grad ? per_sum : 0) : nullptr;
    if (rows > 0 && N <= kExactRowMax) {
      norm_bwd_exact_rows<scalar_t, kCentered>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(weight),
          ptr_or_null<scalar_t>(dresidual_out), dx.data_ptr<scalar_t>(), dw_total, db_total, rows, N, blocks, eps,
          weight_offset);
    } else if (rows > 0) {
      norm_bwd_kernel<scalar_t, kCentered>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          ptr_or_null<scalar_t>(weight), kCentered ? mean.const_data_ptr<acc_t>() : nullptr,
          rstd.const_data_ptr<acc_t>(), ptr_or_null<scalar_t>(dresidual_out),
          dx.data_ptr<scalar_t>(), dw_total, db_total, rows, N, blocks, weight_offset);
    }
    const bool paired = N > kExactRowMax;  // norm_bwd_kernel's totals
    if (weight_grad) sum_blocks(dw_total, blocks, N, paired, dw.data_ptr<scalar_t>());
    if (bias_grad) sum_blocks(db_total, blocks, N, paired, db.data_ptr<scalar_t>());
  });
  return {dx, dw, db};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias,
                                                          const std::optional<Tensor>& residual,
                                                          double eps) {
  return norm_fwd<true>(x, weight, bias, residual, eps, 0.0);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x,
                                                  const std::optional<Tensor>& weight,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const std::optional<Tensor>& dresidual_out,
                                                  bool weight_grad, bool bias_grad, double eps) {
  return norm_bwd<true>(dy, x, weight, mean, rstd, dresidual_out, weight_grad, bias_grad, eps, 0.0);
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x,
                                                const std::optional<Tensor>& weight,
                                                const std::optional<Tensor>& residual,
                                                double eps, double weight_offset) {
  auto [y, residual_out, mean, rstd] = norm_fwd<false>(x, weight, std::nullopt, residual, eps, weight_offset);
  return {y, residual_out, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x,
                                        const std::optional<Tensor>& weight, const Tensor& rstd,
                                        const std::optional<Tensor>& dresidual_out,
                                        bool weight_grad, double eps, double weight_offset) {
  auto [dx, dw, db] =
      norm_bwd<false>(dy, x, weight, Tensor(), rstd, dresidual_out, weight_grad, false, eps, weight_offset);
  return {dx, dw};
}

}  // namespace lmfast::cpu
