// The per-thread arithmetic of the CUDA kernels, as small __host__ __device__ functions, so
// that the host compiler builds the same code for tests/test_cuda_math.py (through
// csrc/cuda/row_math_host.cpp), which checks it against float64 on this machine's CPU.
//
//   Compensated a float sum carried with its rounding error (Knuth's TwoSum), and the merge of
//               two: LayerNorm's row mean. A plain float tree sum of a row far from zero
//               (values ~ 3 +- 0.01) is off by a few ulps of the mean, and the output, scaled by
//               rstd ~ 100, by 4x eager's error (tests/test_cuda_emulation.py found it); this
//               one rounds once, at the end.
//   RowMax      online softmax state (max, sum of exp(v - max)) and its merge; -inf values
//               (masked) contribute nothing, a state of only -inf values has sum 0, and a
//               NaN makes the state NaN for good (as softmax's output is then).
//   Partial     one split of an attention row (max, sum, unnormalized o) and its merge, for
//               the decode kernel's combine step.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define LMFAST_HD __host__ __device__ __forceinline__
#else
#define LMFAST_HD inline
#endif

namespace lmfast::cuda_math {

struct Compensated {
  float hi = 0.f;  // the float sum
  float lo = 0.f;  // what rounding dropped from it (a NaN once an inf was added: the row's mean is then NaN)
};

// Knuth's TwoSum: a + b as the rounded sum s and its exact error (a + b) - s, in float, with
// no FMA or reassociation to break it (neither nvcc nor the host build uses fast math).
LMFAST_HD float two_sum_error(float a, float b, float s) {
  const float b_part = s - a;
  return (a - (s - b_part)) + (b - b_part);
}

LMFAST_HD Compensated compensated_add(Compensated c, float v) {
  const float s = c.hi + v;
  return {s, c.lo + two_sum_error(c.hi, v, s)};
}

// Symmetric (the error is exact, the rest commutes): the two lanes of a butterfly step get
// bit-identical results, so every lane of a row sees the same mean.
LMFAST_HD Compensated compensated_merge(Compensated a, Compensated b) {
  const float s = a.hi + b.hi;
  return {s, two_sum_error(a.hi, b.hi, s) + (a.lo + b.lo)};
}

// (hi + lo) / n rounded about once (torch's CPU mean, which eager LayerNorm on CPU uses,
// accumulates in double and rounds once): q = hi / n, the remainder hi - q n exact by FMA.
LMFAST_HD float compensated_mean(Compensated c, float n) {
  const float q = c.hi / n;
  const float remainder = fmaf(-q, n, c.hi);
  return q + (remainder + c.lo) / n;
}

struct RowMax {
  float max = -INFINITY;
  float sum = 0.f;  // sum of exp(v - max)
};

// max(a, b), NaN if either is NaN (fmaxf drops a NaN: a NaN score would pass for a masked one).
LMFAST_HD float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// exp(a - b) where a <= b, with exp(-inf - -inf) taken as 0 (nothing seen yet: no weight).
LMFAST_HD float exp_below(float a, float b) { return a == -INFINITY ? 0.f : expf(a - b); }

LMFAST_HD RowMax rowmax_add(RowMax s, float v) {
  if (v > s.max || v != v) {  // a NaN becomes the max: NaN from then on
    s.sum = s.sum * exp_below(s.max, v) + 1.f;
    s.max = v;
  } else {
    s.sum += exp_below(v, s.max);
  }
  return s;
}

LMFAST_HD RowMax rowmax_merge(RowMax a, RowMax b) {
  const float m = max_nan(a.max, b.max);
  RowMax r;  // (both empty: max -inf, sum 0)
  r.max = m;
  r.sum = a.sum * exp_below(a.max, m) + b.sum * exp_below(b.max, m);
  return r;
}

// log(sum exp(v)) of the values seen; -inf if none (or all -inf).
LMFAST_HD float rowmax_lse(RowMax s) { return s.sum == 0.f ? -INFINITY : s.max + logf(s.sum); }  // NaN stays

// The factors that rescale two partial attention rows (max ma, mb) onto their merged max:
// o = fa * oa + fb * ob, sum = fa * la + fb * lb.
struct MergeFactors {
  float max, fa, fb;
};

LMFAST_HD MergeFactors merge_factors(float ma, float mb) {
  const float m = max_nan(ma, mb);
  if (m == -INFINITY) return {m, 0.f, 0.f};
  return {m, exp_below(ma, m), exp_below(mb, m)};
}

}  // namespace lmfast::cuda_math
