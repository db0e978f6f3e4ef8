// Softmax over the last dim with fused scale, additive/boolean mask and causal masking, on
// CUDA. Same math and contracts as csrc/cpu/softmax.cpp: x viewed as (B, H, M, N), per row
// (b, h, m):
//
//   z_j = scale * x_j + mask[b, h, m, j]      (boolean mask: -inf where False)
//   z_j = -inf for j > N - M + m              (causal, bottom-right aligned)
//   y_j = exp(z_j - max z) / sum_k exp(z_k - max z)      fully masked row -> y = 0
//   backward: dx_j = scale * y_j * (dy_j - sum_k y_k dy_k)
//
// Geometry as the norms' (device.cuh): a warp per row up to 1024 elements, else a block. The
// forward keeps the row's z in registers where it fits (one read of x), else makes an online
// (max, sum) pass and recomputes z on a second read. The mask is read through its strides
// (0 along broadcast dims), its last-dim stride 0 or 1, so a broadcast mask is never copied.
#include "device.cuh"

namespace lmfast::cuda {
namespace {

template <typename T, typename M, int VEC>
__global__ void softmax_fwd_kernel(const T* __restrict__ x, const M* __restrict__ mask, MaskStrides ms,
                                   T* __restrict__ y, int64_t H, int64_t Mrows, int64_t rows, int64_t N,
                                   float scale, bool causal, int group, bool cached) {
  constexpr int kSlots = kCachedPerThread / VEC;
  constexpr bool kBoolMask = std::is_same_v<M, bool>;
  __shared__ RowMax rowmax_scratch[32];
  __shared__ float sum_scratch[32];
  const auto [tid, first, step] = row_group(group);
  const int64_t nvec = N / VEC;

  for (int64_t row = first; row < rows; row += step) {
    const int64_t m = row % Mrows, h = (row / Mrows) % H, b = row / (Mrows * H);
    const T* xr = x + row * N;
    T* yr = y + row * N;
    const M* mr = mask ? mask + b * ms.b + h * ms.h + m * ms.m : nullptr;
    const int64_t visible = causal ? N - Mrows + m + 1 : N;  // keys j < visible (may be <= 0)
    auto logits = [&](int64_t vi, float (&z)[VEC]) {
      load_floats<T, VEC>(xr + vi * VEC, z);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t j = vi * VEC + e;
        float v = z[e] * scale;
        if (mr) {
          if constexpr (kBoolMask) v = mr[j * ms.n] ? v : -INFINITY;
          else v += to_float(mr[j * ms.n]);
        }
        z[e] = j < visible ? v : -INFINITY;
      }
    };

    if (cached) {
      float z[kSlots][VEC];
      float mx = -INFINITY;
#pragma unroll
      for (int k = 0; k < kSlots; ++k) {
        const int64_t vi = tid + int64_t(k) * group;
        if (vi < nvec) {
          logits(vi, z[k]);
#pragma unroll
          for (int e = 0; e < VEC; ++e) mx = max_nan(mx, z[k][e]);
        }
      }
      mx = group_max(mx, group, sum_scratch);
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < kSlots; ++k)
        if (tid + int64_t(k) * group < nvec)
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            z[k][e] = exp_below(z[k][e], mx);  // 0 for -inf, also on a fully masked row
            sum += z[k][e];
          }
      sum = group_sum(sum, group, sum_scratch);
      const float inv = sum == 0.f ? 0.f : 1.f / sum;  // (a NaN sum stays NaN)
#pragma unroll
      for (int k = 0; k < kSlots; ++k) {
        const int64_t vi = tid + int64_t(k) * group;
        if (vi < nvec) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) z[k][e] *= inv;
          store_floats<T, VEC>(yr + vi * VEC, z[k]);
        }
      }
      continue;
    }

    RowMax st;
    for (int64_t vi = tid; vi < nvec; vi += group) {
      float z[VEC];
      logits(vi, z);
#pragma unroll
      for (int e = 0; e < VEC; ++e) st = rowmax_add(st, z[e]);
    }
    st = group_reduce(st, group, rowmax_scratch, warp_rowmax, rowmax_merge);
    const float inv = st.sum == 0.f ? 0.f : 1.f / st.sum;
    for (int64_t vi = tid; vi < nvec; vi += group) {
      float z[VEC];
      logits(vi, z);
#pragma unroll
      for (int e = 0; e < VEC; ++e) z[e] = exp_below(z[e], st.max) * inv;
      store_floats<T, VEC>(yr + vi * VEC, z);
    }
  }
}

template <typename T, int VEC>
__global__ void softmax_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                                   int64_t rows, int64_t N, float scale, int group) {
  __shared__ float sum_scratch[32];
  const auto [tid, first, step] = row_group(group);
  const int64_t nvec = N / VEC;
  for (int64_t row = first; row < rows; row += step) {
    const T* dyr = dy + row * N;
    const T* yr = y + row * N;
    float dot = 0.f, total = 0.f;
    for (int64_t vi = tid; vi < nvec; vi += group) {
      float d[VEC], p[VEC];
      load_floats<T, VEC>(dyr + vi * VEC, d);
      load_floats<T, VEC>(yr + vi * VEC, p);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dot += d[e] * p[e];
        total += p[e];
      }
    }
    dot = group_sum(dot, group, sum_scratch);
    total = group_sum(total, group, sum_scratch);
    // 16-bit y renormalized to y / total (csrc/cpu/softmax.cpp says why); 0 for a row of zeros
    constexpr bool kRenormalize = sizeof(T) == 2;
    const float coef = !kRenormalize ? scale : total != 0.f ? scale / (total * total) : 0.f;
    for (int64_t vi = tid; vi < nvec; vi += group) {  // second read: from L1/L2
      float d[VEC], p[VEC], out[VEC];
      load_floats<T, VEC>(dyr + vi * VEC, d);
      load_floats<T, VEC>(yr + vi * VEC, p);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = p[e] * (kRenormalize ? fmaf(d[e], total, -dot) : d[e] - dot) * coef;
      store_floats<T, VEC>(dx + row * N + vi * VEC, out);
    }
  }
}

}  // namespace

void launch_softmax_fwd(const SoftmaxFwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  for_dtype(a.dtype, [&]<typename T>() {
    const int vec = vector_width<T>(a.N, {a.x, a.y});
    const RowGeometry geo = row_geometry(a.rows, a.N, kWarpRowMax, kCachedPerThread, vec, int64_t(1) << 30);
    auto run = [&]<typename Mk>(const Mk* mp) {
      if (vec == 1)
        launch(softmax_fwd_kernel<T, Mk, 1>, geo.blocks, geo.threads, 0, stream, static_cast<const T*>(a.x), mp,
            a.mask_strides, static_cast<T*>(a.y), a.H, a.M, a.rows, a.N, a.scale, a.causal, geo.group, geo.cached);
      else
        launch(softmax_fwd_kernel<T, Mk, 16 / sizeof(T)>, geo.blocks, geo.threads, 0, stream,
            static_cast<const T*>(a.x), mp, a.mask_strides, static_cast<T*>(a.y), a.H, a.M, a.rows, a.N, a.scale,
            a.causal, geo.group, geo.cached);
    };
    if (a.mask_kind == kNoMask) run(static_cast<const T*>(nullptr));
    else if (a.mask_kind == kBoolMask) run(static_cast<const bool*>(a.mask));
    else run(static_cast<const T*>(a.mask));
  });
  check_launch();
}

void launch_softmax_bwd(const SoftmaxBwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  for_dtype(a.dtype, [&]<typename T>() {
    const int vec = vector_width<T>(a.N, {a.dy, a.y, a.dx});
    const RowGeometry geo = row_geometry(a.rows, a.N, kWarpRowMax, kCachedPerThread, vec, int64_t(1) << 30);
    const T* d = static_cast<const T*>(a.dy);
    const T* p = static_cast<const T*>(a.y);
    T* out = static_cast<T*>(a.dx);
    if (vec == 1)
      launch(softmax_bwd_kernel<T, 1>, geo.blocks, geo.threads, 0, stream, d, p, out, a.rows, a.N, a.scale, geo.group);
    else
      launch(softmax_bwd_kernel<T, 16 / sizeof(T)>, geo.blocks, geo.threads, 0, stream, d, p, out, a.rows, a.N,
             a.scale, geo.group);
  });
  check_launch();
}

}  // namespace lmfast::cuda
