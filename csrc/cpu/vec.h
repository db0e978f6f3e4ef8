// Vector helpers shared by the CPU kernels.
//
// Include this header FIRST in every csrc/cpu/*.cpp file: it selects the ATen vector ISA
// (AVX512 / AVX2 / portable) from what the compiler targets, and the macros must be set
// before any ATen header is seen. These files are compiled once per ISA level, each with its
// -march (lmfast/_build_flags.py), into one kernel library per level.
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

// float -> 16-bit float for two vectors of floats (a chunk). Where the kernel library's level
// has AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later),
// bfloat16 takes one vcvtne2ps2bf16 for 32 values in place of ATen's integer rounding (~14
// instructions). Both round to nearest even; the instruction flushes denormal inputs to zero,
// so a chunk holding one takes ATen's conversion, and every value but NaN keeps ATen's bits (a
// NaN stays a NaN, its payload may differ).
template <typename scalar_t>
inline Vectorized<scalar_t> from_float(const Vectorized<float>& lo, const Vectorized<float>& hi) {
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const __mmask16 denormal = _mm512_fpclass_ps_mask(__m512(lo), 0x20) | _mm512_fpclass_ps_mask(__m512(hi), 0x20);
    if (__builtin_expect(denormal == 0, 1)) {
      return Vectorized<scalar_t>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(__m512(hi), __m512(lo))));
    }
  }
#endif
  return at::vec::convert_from_float<scalar_t>(lo, hi);
}

// bfloat16 <-> float for Chunk's paired lane order (below): a 512- or 256-bit vector of 16-bit
// bfloat16 values read as 32-bit lanes holds element 2k in the low half of lane k and element
// 2k + 1 in the high half.
#if defined(CPU_CAPABILITY_AVX512)
inline constexpr bool kPairedBFloat16 = true;
using PairedBits = __m512i;
using PairedFloats = __m512;
inline PairedBits bf16_bits(const Vectorized<at::BFloat16>& v) { return __m512i(v); }
inline PairedFloats bf16_even_to_float(PairedBits b) { return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)); }
inline PairedFloats bf16_odd_to_float(PairedBits b) {
  return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(int(0xFFFF0000u))));
}
// f rounded to bfloat16 (to nearest even, as ATen rounds, NaN as ATen's 0xFFFF), the bits in the
// high half of each lane.
inline PairedBits bf16_round_high(PairedFloats f) {
  const __m512i i = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(i, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(-1));
}
// The bfloat16 vector of elements (even[0], odd[0], even[1], odd[1], ...).
inline PairedBits bf16_from_paired(PairedFloats even, PairedFloats odd) {
#if defined(__AVX512BF16__)
  // One vcvtne2ps2bf16 (even elements to the low half, odd to the high) and a word permute,
  // where no value is a denormal, which the instruction flushes to zero (see from_float).
  const __mmask16 denormal = _mm512_fpclass_ps_mask(even, 0x20) | _mm512_fpclass_ps_mask(odd, 0x20);
  if (__builtin_expect(denormal == 0, 1)) {
    const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(interleave, halves);
  }
#endif
  return _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(bf16_round_high(even), 16), bf16_round_high(odd));
}
#elif defined(CPU_CAPABILITY_AVX2)
// (No AVX2 CPU has AVX512-BF16's conversion: the rounding is integer arithmetic, as ATen's.)
inline constexpr bool kPairedBFloat16 = true;
using PairedBits = __m256i;
using PairedFloats = __m256;
inline PairedBits bf16_bits(const Vectorized<at::BFloat16>& v) { return __m256i(v); }
inline PairedFloats bf16_even_to_float(PairedBits b) { return _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)); }
inline PairedFloats bf16_odd_to_float(PairedBits b) {
  return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(int(0xFFFF0000u))));
}
inline PairedBits bf16_round_high(PairedFloats f) {
  const __m256i i = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(i, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(-1), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}
inline PairedBits bf16_from_paired(PairedFloats even, PairedFloats odd) {
  return _mm256_blend_epi16(_mm256_srli_epi32(bf16_round_high(even), 16), bf16_round_high(odd), 0xAA);
}
#else
inline constexpr bool kPairedBFloat16 = false;  // the portable level keeps the plain order
#endif

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
      auto v = from_float<scalar_t>(lo, hi);
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

  // The same chunk in "paired" lane order, for passes that never look at which lane holds
  // which element: reductions, and elementwise passes whose every operand is loaded (and whose
  // result is stored) the same way. For bfloat16 on AVX-512 and AVX2 the paired order holds the
  // even elements in lo and the odd ones in hi: a bfloat16 is the top half of a float, so each
  // pair of them in a 32-bit lane becomes two floats by one shift and one and, where the
  // element order takes ATen's widening shuffles (an extract, two zero-extends and two shifts
  // per chunk; these bound the bfloat16 norms on an AMD Zen 4). Elsewhere it is the plain order.
  static constexpr bool kPaired = kPairedBFloat16 && std::is_same_v<scalar_t, at::BFloat16>;

  static inline Chunk load_paired(const scalar_t* p, int64_t n) {
    if constexpr (kPaired) {
      const auto bits = bf16_bits(n == kChunk ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n));
      return Chunk{Vec(bf16_even_to_float(bits)), Vec(bf16_odd_to_float(bits))};
    } else {
      return load(p, n);
    }
  }

  inline void store_paired(scalar_t* p, int64_t n) const {
    if constexpr (kPaired) {
      const Vectorized<scalar_t> v(bf16_from_paired(lo, hi));
      if (n == kChunk) v.store(p); else v.store(p, n);
    } else {
      store(p, n);
    }
  }

  // store_paired, returning the chunk as stored: its values rounded to scalar_t, as
  // load_paired would read them back (for a sum of what was stored, without reading it back).
  // Lanes past n are not stored; where this chunk's are 0 (as load_paired leaves them) they
  // come back 0.
  inline Chunk store_paired_rounded(scalar_t* p, int64_t n) const {
    if constexpr (kPaired) {
      const auto bits = bf16_from_paired(lo, hi);
      const Vectorized<scalar_t> v(bits);
      if (n == kChunk) v.store(p); else v.store(p, n);
      return Chunk{Vec(bf16_even_to_float(bits)), Vec(bf16_odd_to_float(bits))};
    } else if constexpr (!kReduced) {
      store(p, n);
      return *this;
    } else {
      store(p, n);
      return load(p, n);
    }
  }

  // Where element e of a row of N elements lies when the paired lanes of each chunk are laid
  // out one after the other, lo's first: for a chunk of n elements, (n + 1) / 2 of lo's, then
  // n / 2 of hi's (the layout of add_to_total's float64 totals in norm.cpp).
  static inline int64_t paired_slot(int64_t e, int64_t N) {
    if constexpr (!kPaired) {
      return e;
    } else {
      const int64_t base = e / kChunk * kChunk, n = std::min(kChunk, N - base), r = e - base;
      return base + (r % 2 ? (n + 1) / 2 + r / 2 : r / 2);
    }
  }

  // keep_first for a chunk loaded by load_paired: the first n elements are lanes [0, (n + 1) / 2)
  // of lo and [0, n / 2) of hi.
  inline Chunk keep_first_paired(int64_t n, acc_t fill) const {
    if constexpr (kPaired) {
      if (n >= kChunk) return *this;
      return Chunk{Vec::set(Vec(fill), lo, (n + 1) / 2), Vec::set(Vec(fill), hi, n / 2)};
    } else {
      return keep_first(n, fill);
    }
  }
};

template <typename Vec>
inline auto hsum(const Vec& v) {
  return at::vec::vec_reduce_all([](Vec a, Vec b) { return a + b; }, v);
}

// The total of a pass's two sets of accumulators, each a chunk's two vectors (for_each_chunk_2sets).
template <typename Vec>
inline auto hsum_sets(const Vec (&sets)[2][2]) {
  return hsum((sets[0][0] + sets[0][1]) + (sets[1][0] + sets[1][1]));
}

template <typename Vec>
inline auto hmax(const Vec& v) {
  return at::vec::vec_reduce_all([](Vec a, Vec b) { return at::vec::maximum(a, b); }, v);
}

// Calls f(j, n) for the chunks [j, j + n) of a row of N elements: full chunks first (n is the
// constant K there, so the inlined body has no per-chunk branches), then one partial tail.
template <int64_t K, typename F>
inline void for_each_chunk(int64_t N, const F& f) {
  int64_t j = 0;
  for (; j + K <= N; j += K) f(j, K);
  if (j < N) f(j, N - j);
}

// for_each_chunk for reductions: f(j, n, set) with `set` alternating 0, 1 over the full chunks,
// so a pass can keep two sets of accumulators and one chunk's adds need not wait for the
// previous chunk's (an add's latency, not the loads, bounds a one-set pass over cached data).
template <int64_t K, typename F>
inline void for_each_chunk_2sets(int64_t N, const F& f) {
  int64_t j = 0;
  for (; j + 2 * K <= N; j += 2 * K) {
    f(j, K, 0);
    f(j + K, K, 1);
  }
  if (j + K <= N) {
    f(j, K, 0);
    j += K;
  }
  if (j < N) f(j, N - j, 1);
}

// exp for softmax, where the argument is z - max <= 0. On AVX2 (AVX-512: below): inline, max error 1.25 ulp
// (measured over 32M random arguments; Sleef's out-of-line expf is 1 ulp and ~2x slower),
// exactly 0 below ln(FLT_MIN) (masked entries, -inf, stay exact zeros), NaN propagates,
// accurate up to x = 88.37 and saturating above. Cody-Waite reduction x = n ln2 + r with the
// Cephes degree-6 polynomial for exp(r); 2^n is built in the exponent bits.
template <typename Vec>
inline Vec softmax_exp(const Vec& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX2)
template <>
inline Vectorized<float> softmax_exp(const Vectorized<float>& x) {
  __m256 v = x;
  const __m256 lo = _mm256_set1_ps(-87.33654475f);  // ln(FLT_MIN)
  const __m256 too_small = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
  v = _mm256_max_ps(lo, _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), v));  // NaN kept
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);  // ln2 split in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two_n)), _mm256_setzero_ps(),
                          too_small);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// On AVX-512: 2^(x log2 e) as 2^f 2^n, f in [-1/2, 1/2], with a degree-6 near-minimax
// polynomial for 2^f (fitted for relative error) and 2^n applied by scalef; exactly 0 below
// ln(FLT_MIN), NaN kept. Max error 1.18 ulp (measured over 40M random arguments in [-87, 0];
// the AVX2 version: 1.26). 13 instructions per vector, against the AVX2 version's 20.
template <>
inline Vectorized<float> softmax_exp(const Vectorized<float>& x) {
  const __m512 lo = _mm512_set1_ps(-87.33654475f);
  const __mmask16 keep = _mm512_cmp_ps_mask(__m512(x), lo, _CMP_NLT_UQ);  // false below ln(FLT_MIN)
  const __m512 v = _mm512_max_ps(lo, __m512(x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // f = x log2(e) - n with log2(e) in two parts: x log2(e) rounded to float would be off by
  // up to half an ulp of |x log2 e| (~4e-7 at x = -10), a few ulp of the result.
  __m512 f = _mm512_fmsub_ps(v, _mm512_set1_ps(1.44269502162933349609375f), n);
  f = _mm512_fmadd_ps(v, _mm512_set1_ps(1.925963033500011e-08f), f);
  __m512 p = _mm512_set1_ps(1.5353360504e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398875017e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6184369177e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503323674e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022647738e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718246e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}
#endif

// tanh for attention's logit softcap, which takes one per score: Cephes' tanhf, inline
// (ATen's is Sleef's out-of-line one: 2.8x the time on AVX-512, 2.3x on AVX2, timed alone).
// |x| < 0.625: x + x^3 P(x^2); above: (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.29 from
// softmax_exp (no cancellation), the sign of x put back. Max error 2 ulp (measured over 16M arguments against the double
// tanh, every level; ±inf give ±1, NaN stays NaN). double keeps ATen's.
template <typename Vec>
inline Vec softcap_tanh(const Vec& x) {
  return x.tanh();
}

template <>
inline Vectorized<float> softcap_tanh(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  const Vec sign_bit(-0.f);
  const Vec a = x.abs();
  const Vec e = softmax_exp(a * Vec(-2.f));
  const Vec large = ((Vec(1.f) - e) / (Vec(1.f) + e)) ^ (x & sign_bit);
  const Vec z = x * x;
  Vec p = at::vec::fmadd(Vec(-5.70498872745e-3f), z, Vec(2.06390887954e-2f));
  p = at::vec::fmadd(p, z, Vec(-5.37397155531e-2f));
  p = at::vec::fmadd(p, z, Vec(1.33314422036e-1f));
  p = at::vec::fmadd(p, z, Vec(-3.33332819422e-1f));
  const Vec small = at::vec::fmadd(p * z, x, x);
  return Vec::blendv(large, small, a < Vec(0.625f));
}

// Row kernels read a row from memory once and then work on it in cache; without help the
// next row's memory fetch only starts after that work, and memory time and compute time add
// up. So the cache-resident passes of row i prefetch row i + 1 into L2, the 64-byte lines of
// each chunk: one for a 64-byte chunk, two for float32 / double on AVX-512 (128 bytes).
// Prefetches never fault, but are kept in bounds anyway.
inline constexpr int64_t chunk_bytes(int64_t elem_size) {  // Chunk<T>::kChunk * sizeof(T)
  return elem_size * 2 * (elem_size == 8 ? Vectorized<double>::size() : Vectorized<float>::size());
}
inline void prefetch_row_chunk(const void* row, int64_t j, int64_t elem_size) {
  if (row == nullptr) return;
  const char* p = static_cast<const char*>(row) + j * elem_size;
  __builtin_prefetch(p, 0, 2);
  if (chunk_bytes(elem_size) > 64) __builtin_prefetch(p + 64, 0, 2);
}
inline void prefetch_row_chunk_for_write(void* row, int64_t j, int64_t elem_size) {
  if (row == nullptr) return;
  char* p = static_cast<char*>(row) + j * elem_size;
  __builtin_prefetch(p, 1, 2);
  if (chunk_bytes(elem_size) > 64) __builtin_prefetch(p + 64, 1, 2);
}

// The pass that streams a row in from memory can instead prefetch a fixed distance further
// along its inputs, into the next row near a row's end. That suits kernels whose other pass
// is short (softmax backward; the norms' backward, whose second pass walks several rows):
// measured on an AMD EPYC Zen 5, 4 KB ahead cut their time by 10-20%, while the norms'
// forward (two passes in cache) did better prefetching the next row from those passes.
// `end` bounds the prefetches to the task's rows.
inline constexpr int64_t kPrefetchAheadBytes = 4096;
inline void prefetch_ahead(const void* row, int64_t j, int64_t elem_size, const void* end) {
  const char* p = static_cast<const char*>(row) + j * elem_size + kPrefetchAheadBytes;
  if (p >= static_cast<const char*>(end)) return;
  __builtin_prefetch(p, 0, 2);
  if (chunk_bytes(elem_size) > 64) __builtin_prefetch(p + 64, 0, 2);
}

// Rows per parallel task so that one task touches at least ~32K elements: small rows are
// batched, wide rows are spread one per task.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(row_len, 1));
}

}  // namespace lmfast::cpu
