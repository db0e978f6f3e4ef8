// LayerNorm and RMSNorm over the last dim, forward and backward, on CUDA. Same math and
// contracts as csrc/cpu/norm.cpp (csrc/ops.h): per row of N elements, s = x (+ residual),
//
//   forward:   mu = mean(s) (0 for RMSNorm),  rstd = 1 / sqrt(mean((s - mu)^2) + eps)
//              y  = (s - mu) * rstd * w + b
//   backward:  xhat = (s - mu) * rstd,  g = dy * w
//              ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual_out)
//              dw = sum_rows(dy * xhat),  db = sum_rows(dy)
//
// Rows of up to 1024 elements (512 in the backward) get a warp each, longer rows a block
// (device.cuh: row_geometry). The forward keeps a row in registers where it fits and takes
// the mean (a compensated sum, row_math.h) and then the variance around it over them; a longer
// row is read once per pass (LayerNorm three times, RMSNorm twice; the later reads hit L1/L2).
// The backward reads each row twice. Loads and stores are 128-bit where every row start is
// aligned.
//
// dweight/dbias: each row group (warp or block) owns a fixed set of rows and sums their
// contributions for the columns each thread owns, in registers where they fit, else in its
// own row of a float32 partials buffer; a second kernel sums the partials column by column in
// a fixed order, in double. No atomics: the result is deterministic.
#include "device.cuh"

namespace lmfast::cuda {
namespace {

// 1 / sqrt(v), correctly rounded twice (nvcc's default -prec-sqrt/-prec-div), so within an ulp:
// rsqrtf may be 2 ulps off, and every element of the row carries its error. Once per row.
__device__ __forceinline__ float inverse_sqrt(float v) { return 1.f / sqrtf(v); }

// The mean of a row of N values whose group's threads hold the partial sums `sum`.
__device__ __forceinline__ float row_mean(Compensated sum, int group, Compensated* scratch, int64_t N) {
  return compensated_mean(group_reduce(sum, group, scratch, warp_compensated, compensated_merge), float(N));
}

// A chunk of the weight as floats, plus w_offset (RMSNorm's scale is w_offset + weight: 1 +
// weight in Gemma's). Offset 0 is not added, so that a -0 weight stays -0.
template <typename T, int VEC>
__device__ __forceinline__ void load_weight(const T* w, float (&out)[VEC], float w_offset) {
  load_floats<T, VEC>(w, out);
  if (w_offset != 0.f)
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] += w_offset;
}

// Forward, one row per group. `cached`: the row fits kCachedPerThread elements per thread.
template <typename T, int VEC, bool kCentered>
__global__ void norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                const T* __restrict__ weight, const T* __restrict__ bias,
                                T* __restrict__ y, T* __restrict__ s_out, float* __restrict__ mean_out,
                                float* __restrict__ rstd_out, int64_t rows, int64_t N, float eps,
                                float w_offset, int group, bool cached) {
  constexpr int kSlots = kCachedPerThread / VEC;
  __shared__ Compensated compensated_scratch[32];
  __shared__ float sum_scratch[32];
  const auto [tid, first, step] = row_group(group);
  const int64_t nvec = N / VEC;
  const float inv_n = 1.f / float(N);

  for (int64_t row = first; row < rows; row += step) {
    const T* xr = x + row * N;
    const T* rr = residual ? residual + row * N : nullptr;
    T* sr = s_out ? s_out + row * N : nullptr;
    T* yr = y + row * N;
    // s = x + residual, rounded to T as eager's add would; stored when a residual is given.
    auto load_s = [&](int64_t vi, float (&v)[VEC]) {
      load_floats<T, VEC>(xr + vi * VEC, v);
      if (rr) {
        float r[VEC];
        load_floats<T, VEC>(rr + vi * VEC, r);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = round_to<T>(v[e] + r[e]);
        store_floats<T, VEC>(sr + vi * VEC, v);
      }
    };
    auto write_y = [&](int64_t vi, const float (&v)[VEC], float mu, float rstd) {
      float w[VEC], b[VEC], out[VEC];
      if (weight) load_weight<T, VEC>(weight + vi * VEC, w, w_offset);
      if (bias) load_floats<T, VEC>(bias + vi * VEC, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float o = (v[e] - mu) * rstd;
        if (weight) o *= w[e];
        if (bias) o += b[e];
        out[e] = o;
      }
      store_floats<T, VEC>(yr + vi * VEC, out);
    };

    float mu = 0.f, var = 0.f;
    if (cached) {
      float vals[kSlots][VEC];
      Compensated sum;
#pragma unroll
      for (int k = 0; k < kSlots; ++k) {
        const int64_t vi = tid + int64_t(k) * group;
        if (vi < nvec) {
          load_s(vi, vals[k]);
          if constexpr (kCentered)
#pragma unroll
            for (int e = 0; e < VEC; ++e) sum = compensated_add(sum, vals[k][e]);
        }
      }
      if constexpr (kCentered) mu = row_mean(sum, group, compensated_scratch, N);
      float sq = 0.f;  // second pass, over the registers: exact for any mean
#pragma unroll
      for (int k = 0; k < kSlots; ++k)
        if (tid + int64_t(k) * group < nvec)
#pragma unroll
          for (int e = 0; e < VEC; ++e) sq += (vals[k][e] - mu) * (vals[k][e] - mu);
      var = group_sum(sq, group, sum_scratch) * inv_n;
      const float rstd = inverse_sqrt(var + eps);
#pragma unroll
      for (int k = 0; k < kSlots; ++k) {
        const int64_t vi = tid + int64_t(k) * group;
        if (vi < nvec) write_y(vi, vals[k], mu, rstd);
      }
      if (tid == 0) {
        if (kCentered) mean_out[row] = mu;
        rstd_out[row] = rstd;
      }
      continue;
    }

    // Long row: the first read sums it (LayerNorm) or its squares (RMSNorm); LayerNorm reads it
    // again for the squares around the mean (exact for any mean); the last read writes y. The
    // later reads come from L1/L2, s from where this thread just stored it.
    const T* src = rr ? sr : xr;
    Compensated sum;
    float sq = 0.f;
    for (int64_t vi = tid; vi < nvec; vi += group) {
      float v[VEC];
      load_s(vi, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if constexpr (kCentered) sum = compensated_add(sum, v[e]);
        else sq += v[e] * v[e];
      }
    }
    if constexpr (kCentered) {
      mu = row_mean(sum, group, compensated_scratch, N);
      for (int64_t vi = tid; vi < nvec; vi += group) {
        float v[VEC];
        load_floats<T, VEC>(src + vi * VEC, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sq += (v[e] - mu) * (v[e] - mu);
      }
    }
    var = group_sum(sq, group, sum_scratch) * inv_n;
    const float rstd = inverse_sqrt(var + eps);
    for (int64_t vi = tid; vi < nvec; vi += group) {
      float v[VEC];
      load_floats<T, VEC>(src + vi * VEC, v);
      write_y(vi, v, mu, rstd);
    }
    if (tid == 0) {
      if (kCentered) mean_out[row] = mu;
      rstd_out[row] = rstd;
    }
  }
}

// Backward, one row per group; this group's dweight/dbias partials go to row `g` of
// dw_part/db_part (null: not wanted), or stay in registers while the row fits kBwdRegCols
// columns per thread (`in_regs`).
constexpr int kBwdRegCols = 16;

template <typename T, int VEC, bool kCentered>
__global__ void norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                const T* __restrict__ weight, const float* __restrict__ mean,
                                const float* __restrict__ rstd, const T* __restrict__ dres,
                                T* __restrict__ dx, float* __restrict__ dw_part,
                                float* __restrict__ db_part, int64_t rows, int64_t N, float w_offset,
                                int group, bool in_regs) {
  constexpr int kSlots = kBwdRegCols / VEC;
  __shared__ float sum_scratch[32];
  const auto [tid, g, ngroups] = row_group(group);  // (g: this group's index and first row)
  const int64_t nvec = N / VEC;
  const float inv_n = 1.f / float(N);
  float acc_w[kSlots][VEC] = {}, acc_b[kSlots][VEC] = {};
  float* dwp = dw_part ? dw_part + g * N : nullptr;
  float* dbp = db_part ? db_part + g * N : nullptr;
  if (!in_regs) {  // this group's partial rows start at zero (its own columns only)
    for (int64_t vi = tid; vi < nvec; vi += group)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (dwp) dwp[vi * VEC + e] = 0.f;
        if (dbp) dbp[vi * VEC + e] = 0.f;
      }
  }

  for (int64_t row = g; row < rows; row += ngroups) {
    const T* dyr = dy + row * N;
    const T* xr = x + row * N;
    const float mu = kCentered ? mean[row] : 0.f, rs = rstd[row];
    // pass 1: mean(g * xhat) and mean(g)
    float sum_gx = 0.f, sum_g = 0.f;
    for (int64_t vi = tid; vi < nvec; vi += group) {
      float d[VEC], v[VEC], w[VEC];
      load_floats<T, VEC>(dyr + vi * VEC, d);
      load_floats<T, VEC>(xr + vi * VEC, v);
      if (weight) load_weight<T, VEC>(weight + vi * VEC, w, w_offset);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float gv = weight ? d[e] * w[e] : d[e];
        sum_gx += gv * (v[e] - mu) * rs;
        sum_g += gv;
      }
    }
    const float c1 = group_sum(sum_gx, group, sum_scratch) * inv_n;
    const float c2 = kCentered ? group_sum(sum_g, group, sum_scratch) * inv_n : 0.f;
    // pass 2: dx, and this row's share of dweight/dbias
    int k = 0;
    for (int64_t vi = tid; vi < nvec; vi += group, ++k) {
      float d[VEC], v[VEC], w[VEC], out[VEC];
      load_floats<T, VEC>(dyr + vi * VEC, d);
      load_floats<T, VEC>(xr + vi * VEC, v);
      if (weight) load_weight<T, VEC>(weight + vi * VEC, w, w_offset);
      float r[VEC];
      if (dres) load_floats<T, VEC>(dres + row * N + vi * VEC, r);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xhat = (v[e] - mu) * rs;
        const float gv = weight ? d[e] * w[e] : d[e];
        out[e] = rs * (gv - c2 - xhat * c1) + (dres ? r[e] : 0.f);
        if (in_regs) {
#pragma unroll
          for (int s = 0; s < kSlots; ++s)  // (k is a run-time index: select the slot)
            if (s == k) {
              acc_w[s][e] += d[e] * xhat;
              acc_b[s][e] += d[e];
            }
        } else {
          if (dwp) dwp[vi * VEC + e] += d[e] * xhat;
          if (dbp) dbp[vi * VEC + e] += d[e];
        }
      }
      store_floats<T, VEC>(dx + row * N + vi * VEC, out);
    }
  }
  if (in_regs && g < ngroups) {
    int k = 0;
    for (int64_t vi = tid; vi < nvec; vi += group, ++k)
#pragma unroll
      for (int s = 0; s < kSlots; ++s)
        if (s == k)
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            if (dwp) dwp[vi * VEC + e] = acc_w[s][e];
            if (dbp) dbp[vi * VEC + e] = acc_b[s][e];
          }
  }
}

// Rows of at most kExactRowMax elements, a thread per row: their statistics are recomputed in
// double and dx formed from terms that do not cancel, rounded once (csrc/cpu/norm.cpp,
// norm_bwd_exact_rows, has the why and the algebra: a short row's input gradient is mostly
// cancellation). Thread t walks rows t, t + threads,
// ... and leaves its dweight/dbias sums in partial row t.
constexpr int kExactRowMax = 8;
constexpr int kExactThreads = 128, kExactBlocksMax = 64;

template <typename T, bool kCentered>
__global__ void norm_bwd_exact_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                           const T* __restrict__ weight, const T* __restrict__ dres,
                                           T* __restrict__ dx, double* __restrict__ dw_part,
                                           double* __restrict__ db_part, int64_t rows, int N, double eps,
                                           double w_offset) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = gridDim.x * int64_t(blockDim.x);
  double dw[kExactRowMax] = {}, db[kExactRowMax] = {};
  for (int64_t row = t; row < rows; row += stride) {
    const T* xr = x + row * N;
    const T* dyr = dy + row * N;
    double d[kExactRowMax], g[kExactRowMax];
    double mu = 0, dd = 0, dg = 0, g_mean = 0;
#pragma unroll
    for (int j = 0; j < kExactRowMax; ++j)
      if (kCentered && j < N) mu += double(to_float(xr[j]));
    mu /= double(N);
#pragma unroll
    for (int j = 0; j < kExactRowMax; ++j) {
      if (j >= N) {  // (unrolled over kExactRowMax: nothing past the row is read)
        d[j] = g[j] = 0.0;
        continue;
      }
      d[j] = double(to_float(xr[j])) - mu;
      const double w = !weight ? 1.0 : w_offset != 0 ? double(to_float(weight[j])) + w_offset
                                                      : double(to_float(weight[j]));
      g[j] = double(to_float(dyr[j])) * w;
      dd += d[j] * d[j];
      dg += d[j] * g[j];
      g_mean += g[j];
    }
    g_mean = kCentered ? g_mean / double(N) : 0.0;
    const double var = dd / double(N), rstd = 1.0 / sqrt(var + eps);
    const double p = dd > 0 ? dg / dd : 0.0;
    const bool spanned = dd > 0 && N == (kCentered ? 2 : 1);
    const double eps_share = eps / (var + eps);
#pragma unroll
    for (int j = 0; j < kExactRowMax; ++j) {
      if (j >= N) continue;
      const double removed = spanned ? 0.0 : g[j] - g_mean - d[j] * p;
      double out = rstd * (removed + d[j] * p * eps_share);
      if (dres) out += double(to_float(dres[row * N + j]));
      dx[row * N + j] = from_float<T>(float(out));
      const double dyj = double(to_float(dyr[j]));
      dw[j] += dyj * d[j] * rstd;
      db[j] += dyj;
    }
  }
#pragma unroll
  for (int j = 0; j < kExactRowMax; ++j) {
    if (j >= N) continue;
    if (dw_part) dw_part[t * N + j] = dw[j];
    if (db_part) db_part[t * N + j] = db[j];
  }
}

// out[c] = sum over groups of part[g, c], in group order (deterministic), in double: a float
// sum over a thousand partials would add ~sqrt(groups) ulps, where eager's tree sum adds ~1
// (the CPU kernels also keep their totals in double).
template <typename T, typename P>
__global__ void column_sum_kernel(const P* __restrict__ part, int64_t groups, int64_t N, T* __restrict__ out) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= N) return;
  double s = 0.0;
  for (int64_t g = 0; g < groups; ++g) s += double(part[g * N + c]);
  out[c] = from_float<T>(float(s));
}

// ---- launchers ---------------------------------------------------------------------------

template <typename T, bool kCentered>
void run_norm_fwd(const NormFwdArgs& a, cudaStream_t stream) {
  const int64_t N = a.N, rows = a.rows;
  const int vec = vector_width<T>(N, {a.x, a.weight, a.bias, a.residual, a.y, a.s_out});
  const RowGeometry geo = row_geometry(rows, N, kWarpRowMax, kCachedPerThread, vec, 65535 * 16);
  auto run = [&](auto kernel) {
    launch(kernel, geo.blocks, geo.threads, 0, stream,
        static_cast<const T*>(a.x), static_cast<const T*>(a.residual), static_cast<const T*>(a.weight),
        static_cast<const T*>(a.bias), static_cast<T*>(a.y), static_cast<T*>(a.s_out), kCentered ? a.mean : nullptr,
        a.rstd, rows, N, float(a.eps), float(a.w_offset), geo.group, geo.cached);
  };
  if (vec == 1) run(norm_fwd_kernel<T, 1, kCentered>);
  else run(norm_fwd_kernel<T, 16 / sizeof(T), kCentered>);
  check_launch();
}

template <typename T, bool kCentered>
void run_norm_bwd_exact_rows(const NormBwdArgs& a, Workspace& workspace, cudaStream_t stream) {
  const int N = int(a.N);
  // a fixed number of threads for a given row count (never from the GPU): results repeat on any GPU
  const int blocks = int(std::min<int64_t>(kExactBlocksMax, ceil_div(a.rows, kExactThreads)));
  const int64_t partial_rows = int64_t(blocks) * kExactThreads;
  // each thread's sums, kept in double, zeroed (a thread with no rows leaves its row of zeros)
  auto zeroed_partials = [&]() {
    const size_t bytes = size_t(partial_rows) * N * sizeof(double);
    void* p = workspace.allocate(bytes);
    check_cuda(cudaMemsetAsync(p, 0, bytes, stream), "cudaMemsetAsync");
    return static_cast<double*>(p);
  };
  double* dw_part = a.dw ? zeroed_partials() : nullptr;
  double* db_part = a.db ? zeroed_partials() : nullptr;
  launch(norm_bwd_exact_rows_kernel<T, kCentered>, blocks, kExactThreads, 0, stream,
      static_cast<const T*>(a.dy), static_cast<const T*>(a.x), static_cast<const T*>(a.weight),
      static_cast<const T*>(a.dres), static_cast<T*>(a.dx), dw_part, db_part, a.rows, N, a.eps, a.w_offset);
  check_launch();
  if (a.dw)
    launch(column_sum_kernel<T, double>, 1, 256, 0, stream, static_cast<const double*>(dw_part), partial_rows,
           int64_t(N), static_cast<T*>(a.dw));
  if (a.db)
    launch(column_sum_kernel<T, double>, 1, 256, 0, stream, static_cast<const double*>(db_part), partial_rows,
           int64_t(N), static_cast<T*>(a.db));
  check_launch();
}

template <typename T, bool kCentered>
void run_norm_bwd(const NormBwdArgs& a, Workspace& workspace, cudaStream_t stream) {
  const int64_t N = a.N, rows = a.rows;
  if (rows == 0) {  // no rows: zero weight gradients (else column_sum_kernel writes every column)
    if (a.dw) check_cuda(cudaMemsetAsync(a.dw, 0, size_t(N) * sizeof(T), stream), "cudaMemsetAsync");
    if (a.db) check_cuda(cudaMemsetAsync(a.db, 0, size_t(N) * sizeof(T), stream), "cudaMemsetAsync");
    return;
  }
  if (N <= kExactRowMax) return run_norm_bwd_exact_rows<T, kCentered>(a, workspace, stream);
  const int vec = vector_width<T>(N, {a.dy, a.x, a.weight, a.dres, a.dx});
  RowGeometry geo = row_geometry(rows, N, kWarpRowMax / 2, kBwdRegCols, vec, rows);
  // About half the threads the SMs hold, no more: each row group adds a row of partials.
  geo.blocks = std::min<int64_t>(geo.blocks, int64_t(multiprocessors()) * std::max(1, 1024 / geo.threads));
  const int64_t groups = geo.blocks * (geo.threads / geo.group);
  auto partials = [&]() { return static_cast<float*>(workspace.allocate(size_t(groups) * N * sizeof(float))); };
  float* dw_part = a.dw ? partials() : nullptr;
  float* db_part = a.db ? partials() : nullptr;
  auto run = [&](auto kernel) {
    launch(kernel, geo.blocks, geo.threads, 0, stream,
        static_cast<const T*>(a.dy), static_cast<const T*>(a.x), static_cast<const T*>(a.weight),
        kCentered ? a.mean : nullptr, a.rstd, static_cast<const T*>(a.dres), static_cast<T*>(a.dx), dw_part, db_part,
        rows, N, float(a.w_offset), geo.group, geo.cached);
  };
  if (vec == 1) run(norm_bwd_kernel<T, 1, kCentered>);
  else run(norm_bwd_kernel<T, 16 / sizeof(T), kCentered>);
  check_launch();
  const unsigned col_blocks = unsigned(ceil_div(N, 256));
  if (a.dw)
    launch(column_sum_kernel<T, float>, col_blocks, 256, 0, stream, static_cast<const float*>(dw_part), groups, N,
           static_cast<T*>(a.dw));
  if (a.db)
    launch(column_sum_kernel<T, float>, col_blocks, 256, 0, stream, static_cast<const float*>(db_part), groups, N,
           static_cast<T*>(a.db));
  check_launch();
}

}  // namespace

void launch_norm_fwd(const NormFwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  for_dtype(a.dtype, [&]<typename T>() {
    if (a.centered) run_norm_fwd<T, true>(a, stream);
    else run_norm_fwd<T, false>(a, stream);
  });
}

void launch_norm_bwd(const NormBwdArgs& a, Workspace& workspace, cudaStream_t stream) {
  for_dtype(a.dtype, [&]<typename T>() {
    if (a.centered) run_norm_bwd<T, true>(a, workspace, stream);
    else run_norm_bwd<T, false>(a, workspace, stream);
  });
}

}  // namespace lmfast::cuda
