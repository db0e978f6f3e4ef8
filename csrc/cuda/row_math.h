// The per-thread arithmetic of the CUDA kernels, as small __host__ __device__ functions, so
// that the host compiler builds the same code for tests/test_cuda_math.py (through
// csrc/cuda/row_math_host.cpp), which checks it against float64 on this machine's CPU.
//
//   Welford     running mean and sum of squared deviations (m2) of a stream of values, and
//               the merge of two such states (Chan et al.): what a thread keeps over a row too
//               long for its registers, and what threads combine in a reduction.
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

struct Welford {
  float mean = 0.f;
  float m2 = 0.f;     // sum of (v - mean)^2
  float count = 0.f;  // float: merges divide by it; exact up to 2^24 values
};

LMFAST_HD Welford welford_add(Welford a, float v) {
  a.count += 1.f;
  const float delta = v - a.mean;
  a.mean += delta / a.count;
  a.m2 += delta * (v - a.mean);
  return a;
}

LMFAST_HD Welford welford_merge(Welford a, Welford b) {
  if (b.count == 0.f) return a;
  if (a.count == 0.f) return b;
  const float n = a.count + b.count;
  const float wb = b.count / n;  // b's share
  const float delta = b.mean - a.mean;
  Welford r;
  r.count = n;
  r.mean = a.mean + delta * wb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
  return r;
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
