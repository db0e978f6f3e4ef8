// Vector helpers shared by the CPU kernels.
//
// Include this header FIRST in every csrc/cpu/*.cpp file: it selects the ATen vector ISA
// (AVX512 / AVX2 / portable) from what the compiler targets, and the macros must be set
// before any ATen header is seen. setup.py compiles with -march=native by default
// (LMFAST_CPU_ARCH overrides), so the build machine's best ISA is used.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>

namespace lmfast::cpu {

using at::vec::Vectorized;

// Rows are walked in chunks of kChunk = 2 * Vec::size() elements, held as two vectors of the
// accumulation type acc_t (float for float/half/bfloat16, double for double): a chunk of
// 16-bit floats converts to exactly two float vectors. The last chunk of a row may be partial
// (n < kChunk); lanes past n load as zero and are never stored.
template <typename scalar_t>
struct Chunk {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kChunk = 2 * kVec;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;

  Vec lo, hi;

  static inline Chunk load(const scalar_t* p, int64_t n) {
    Chunk c;
    if constexpr (kReduced) {
      auto v = n == kChunk ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
      std::tie(c.lo, c.hi) = at::vec::convert_to_float<scalar_t>(v);
    } else if (n == kChunk) {
      c.lo = Vec::loadu(p);
      c.hi = Vec::loadu(p + kVec);
    } else {
      c.lo = Vec::loadu(p, std::min(n, kVec));
      c.hi = n > kVec ? Vec::loadu(p + kVec, n - kVec) : Vec(acc_t(0));
    }
    return c;
  }

  inline void store(scalar_t* p, int64_t n) const {
    if constexpr (kReduced) {
      auto v = at::vec::convert_from_float<scalar_t>(lo, hi);
      if (n == kChunk) v.store(p); else v.store(p, n);
    } else if (n == kChunk) {
      lo.store(p);
      hi.store(p + kVec);
    } else {
      lo.store(p, std::min(n, kVec));
      if (n > kVec) hi.store(p + kVec, n - kVec);
    }
  }

  // The same chunk shape over an acc_t buffer (e.g. float partial sums beside bf16 data).
  static inline Chunk load_acc(const acc_t* p, int64_t n) {
    const auto a = Chunk<acc_t>::load(p, n);
    return Chunk{a.lo, a.hi};
  }
  inline void store_acc(acc_t* p, int64_t n) const { Chunk<acc_t>{lo, hi}.store(p, n); }

  // Lanes at index >= n replaced by `fill` (e.g. 0 for sums of squares, -inf for max).
  inline Chunk keep_first(int64_t n, acc_t fill) const {
    if (n >= kChunk) return *this;
    Chunk c;
    c.lo = n >= kVec ? lo : Vec::set(Vec(fill), lo, n);
    c.hi = n <= kVec ? Vec(fill) : Vec::set(Vec(fill), hi, n - kVec);
    return c;
  }
};

template <typename Vec>
inline auto hsum(const Vec& v) {
  return at::vec::vec_reduce_all([](Vec a, Vec b) { return a + b; }, v);
}

template <typename Vec>
inline auto hmax(const Vec& v) {
  return at::vec::vec_reduce_all([](Vec a, Vec b) { return at::vec::maximum(a, b); }, v);
}

// Compensated (Kahan) sum, lane-wise: for the few sums whose rounding shows in every output
// of a row (the softmax denominator, the softmax-backward dot product). Lanes are combined
// in double, so the result is about as accurate as the inputs allow.
template <typename Vec>
struct CompensatedSum {
  Vec sum = Vec(0), carry = Vec(0);  // carry: the low-order part lost from `sum`

  inline void add(const Vec& v) {
    const Vec y = v - carry;
    const Vec t = sum + y;
    carry = (t - sum) - y;
    sum = t;
  }

  inline auto result() const {
    using acc_t = typename Vec::value_type;
    alignas(64) acc_t s[Vec::size()], c[Vec::size()];
    sum.store(s);
    carry.store(c);
    double total = 0;
    for (int64_t i = 0; i < Vec::size(); ++i) total += double(s[i]) - double(c[i]);
    return acc_t(total);
  }
};

// Rows per parallel task so that one task touches at least ~32K elements: small rows are
// batched, wide rows are spread one per task.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(row_len, 1));
}

}  // namespace lmfast::cpu
