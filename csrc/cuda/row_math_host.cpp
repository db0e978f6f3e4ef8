// Host build of csrc/cuda/row_math.h for tests/test_cuda_math.py: C entry points that run the
// CUDA kernels' per-thread arithmetic the way the kernels combine it, on the CPU.
//   chunks/splits emulate threads: each runs the sequential update over its contiguous part,
//   then the states are merged by the butterfly a warp's xor-shuffles perform (chunks a power
//   of two) or, for the attention splits, in the combine kernel's order.
// Not part of the package build: the test compiles it with the host compiler.
#include <cstdint>
#include <vector>

#include "row_math.h"

using namespace lmfast::cuda_math;

namespace {

template <typename S, typename Merge>
S butterfly(std::vector<S> states, Merge merge) {
  const size_t n = states.size();  // a power of two
  for (size_t o = n / 2; o > 0; o >>= 1) {
    std::vector<S> next(n);
    for (size_t i = 0; i < n; ++i) next[i] = merge(states[i], states[i ^ o]);
    states.swap(next);
  }
  return states[0];
}

// The contiguous part [begin, end) of n values that chunk c of `chunks` takes.
void part(int64_t n, int64_t chunks, int64_t c, int64_t& begin, int64_t& end) {
  begin = n * c / chunks;
  end = n * (c + 1) / chunks;
}

}  // namespace

extern "C" {

// Mean of x[0..n) as LayerNorm's forward takes it: a compensated sum per chunk, the chunks'
// sums merged by the butterfly.
float lmfast_compensated_mean(const float* x, int64_t n, int64_t chunks) {
  std::vector<Compensated> states(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t b, e;
    part(n, chunks, c, b, e);
    for (int64_t i = b; i < e; ++i) states[c] = compensated_add(states[c], x[i]);
  }
  return compensated_mean(butterfly(states, compensated_merge), float(n));
}

// logsumexp of x[0..n) (-inf entries are masked) by the online (max, sum) per chunk, merged.
float lmfast_rowmax_lse(const float* x, int64_t n, int64_t chunks) {
  std::vector<RowMax> states(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t b, e;
    part(n, chunks, c, b, e);
    for (int64_t i = b; i < e; ++i) states[c] = rowmax_add(states[c], x[i]);
  }
  return rowmax_lse(butterfly(states, rowmax_merge));
}

// One attention row as the decode kernel computes it: scores s (n,), values v (n, d) row-major;
// each of `splits` splits runs the online softmax over its keys, then the combine step merges
// the splits. Writes o (d,) and returns lse.
float lmfast_split_attention(const float* s, const float* v, int64_t n, int64_t d, int64_t splits, float* o) {
  std::vector<float> m(splits, -INFINITY), l(splits, 0.f), acc(splits * d, 0.f);
  for (int64_t c = 0; c < splits; ++c) {
    int64_t b, e;
    part(n, splits, c, b, e);
    for (int64_t j = b; j < e; ++j) {
      const MergeFactors f = merge_factors(m[c], s[j]);  // (old state, the new key)
      l[c] = l[c] * f.fa + f.fb;
      for (int64_t t = 0; t < d; ++t) acc[c * d + t] = acc[c * d + t] * f.fa + f.fb * v[j * d + t];
      m[c] = f.max;
    }
  }
  float mx = -INFINITY;
  for (int64_t c = 0; c < splits; ++c) mx = max_nan(mx, m[c]);
  float total = 0.f;
  for (int64_t c = 0; c < splits; ++c) total += exp_below(m[c], mx) * l[c];
  for (int64_t t = 0; t < d; ++t) {
    float sum = 0.f;
    for (int64_t c = 0; c < splits; ++c) sum += exp_below(m[c], mx) * acc[c * d + t];
    o[t] = total == 0.f ? 0.f : sum / total;
  }
  return total == 0.f ? -INFINITY : mx + logf(total);
}

}  // extern "C"
