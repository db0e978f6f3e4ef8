// Attention forward on CUDA: same math and contract as csrc/cpu/attention.cpp (csrc/ops.h):
//
//   s = scale * q k^T + mask   (boolean mask: -inf where False; -inf outside the key band:
//                               causal keeps keys j <= i + Sk - Sq, a window w keeps j > i + Sk - Sq - w;
//                               packed documents: each row's band inside its document, ../documents.h;
//                               a softcap c > 0 takes c tanh(scale * q k^T / c) before the mask)
//   o = softmax(s) v,  lse = logsumexp(s);  a row with every key masked gives o = 0, lse = -inf
//   dropout: the entries of softmax(s) that ../dropout_hash.h drops weigh 0 in o, the rest are
//   scaled by 1 / (1 - dropout_p); l and lse are the undropped ones
//
// q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) with any strides and a contiguous
// head dim; query head h reads kv head h / (Hq / Hkv) (grouped-query attention, nothing
// repeated); o is written in (B, Sq, Hq, Dv) memory order, lse (B, Hq, Sq) and the row stats
// (2, B, Hq, Sq) that the backward (Triton's) takes, each row's max m and 1 / l (csrc/ops.h),
// in float32. Dv may differ from D (DeepSeek's multi-head latent attention: 192 over 128): the
// kernels work at one padded head dim Dp, that of the larger, and read and write each tensor's
// own (zeros past it, which add nothing to q k^T and make o columns that are not written).
//
// Two kernels:
//   prefill   a block of 16 * WARPS query rows of one head walks the key tiles its rows may
//             see (flash attention: online softmax, scores never leave shared memory). The tile
//             products run on tensor cores (WMMA 16x16x16, float32 accumulation) for
//             float16/bfloat16, on the CUDA cores for float32 (eager's precision). Each warp
//             owns 16 rows: scores, probabilities and its float32 output rows live in shared
//             memory, so the rescale by exp(m_old - m_new) is a plain loop (a WMMA fragment's
//             layout is unspecified), and the product adds onto the loaded output.
//   decode    for few query rows and long caches: the keys are split over blocks (split-K),
//             each block keeps (max, sum, unnormalized o) per split in a float32 workspace, and
//             a combine kernel merges the splits (row_math.h: merge_factors).
// The backward on CUDA is the Triton kernel's (lmfast/ops/attention.py).
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "../documents.h"
#include "../dropout_hash.h"
#include "device.cuh"

namespace lmfast::cuda {
namespace {

// ---- what every kernel reads: AttnParams (kernels.h) ------------------------------------

// The dropout hash of (b, h, i)'s row, computed once per row (0 without dropout: unused).
__device__ __forceinline__ uint32_t dropout_row_key(const AttnParams& p, int b, int h, int i) {
  if (p.dropout_seed == nullptr) return 0;
  return dropout::row_key(static_cast<uint64_t>(*p.dropout_seed), (uint64_t(b) * p.Hq + h) * p.Sq + i);
}

// Whether key j of the row with hash rk weighs in o.
__device__ __forceinline__ bool kept(const AttnParams& p, uint32_t rk, int j) {
  return p.dropout_seed == nullptr || dropout::kept(rk, j, p.drop_threshold);
}

// The keys query row i may see, [lo, hi) (causal/window band, as KeyBand in the CPU kernels).
__device__ __forceinline__ int band_lo(const AttnParams& p, int i) {
  if (p.doc_bands != nullptr) return p.doc_bands[i];
  return p.window > 0 ? max(0, i + p.Sk - p.Sq - p.window + 1) : 0;
}
__device__ __forceinline__ int band_hi(const AttnParams& p, int i) {
  if (p.doc_bands != nullptr) return p.doc_bands[p.Sq + i];
  return p.causal ? min(max(i + p.Sk - p.Sq + 1, 0), p.Sk) : p.Sk;
}

// Where the mask value of query (b, h, i) and key j lives, in elements (0 strides along broadcast dims).
__device__ __forceinline__ int64_t mask_offset(const AttnParams& p, int b, int h, int i, int j) {
  return b * p.mask_strides[0] + h * p.mask_strides[1] + int64_t(i) * p.mask_strides[2] +
         int64_t(j) * p.mask_strides[3];
}

// Whether a boolean mask keeps any key of [j0, j0 + n) for a query of [i0, i0 + m), each within
// its band. A tile it drops whole (other documents' keys in packed sequences, a padded stretch)
// changes nothing and is skipped; the answer is a block-wide vote, the same in every thread, so
// the whole block skips together.
__device__ bool bool_mask_keeps_tile(const AttnParams& p, int b, int h, int i0, int m, int j0, int n) {
  bool keeps = false;
  for (int c = threadIdx.x; c < m * n && !keeps; c += blockDim.x) {
    const int i = i0 + c / n, j = j0 + c % n;  // (consecutive threads: consecutive keys of a row)
    if (i < p.Sq && j >= band_lo(p, i) && j < band_hi(p, i))
      keeps = static_cast<const bool*>(p.mask)[mask_offset(p, b, h, i, j)];
  }
  return __syncthreads_or(keeps) != 0;
}

// scale * dot, capped by the softcap if any (before the mask is added).
__device__ __forceinline__ float scaled_score(const AttnParams& p, float dot) {
  const float s = dot * p.scale;
  return p.softcap > 0.f ? p.softcap * tanhf(s / p.softcap) : s;
}

// Whether a boolean mask hides key j from query (b, h, i).
__device__ __forceinline__ bool bool_masked(const AttnParams& p, int b, int h, int i, int j) {
  return p.mask_kind == kBoolMask && !static_cast<const bool*>(p.mask)[mask_offset(p, b, h, i, j)];
}

// The score of query (b, h, i) at key j of its band, as scaled_score; plus an additive mask's
// value. (Boolean masks select, the caller's part: a hidden key weighs nothing, whatever its score.)
template <typename T>
__device__ __forceinline__ float band_score(const AttnParams& p, float dot, int b, int h, int i, int j) {
  const float s = scaled_score(p, dot);
  return p.mask_kind == kAdditiveMask ? s + to_float(static_cast<const T*>(p.mask)[mask_offset(p, b, h, i, j)]) : s;
}

// scale * dot (capped) + mask for query (b, h, i) and key j, -inf outside the band or masked off.
template <typename T>
__device__ __forceinline__ float masked_score(const AttnParams& p, float dot, int b, int h, int i, int j) {
  if (j < band_lo(p, i) || j >= band_hi(p, i) || bool_masked(p, b, h, i, j)) return -INFINITY;
  return band_score<T>(p, dot, b, h, i, j);
}

// A row's lse = m + log(l) (-inf on a fully masked row, +inf where a score is +inf: l is NaN
// there), and its row stats for the backward (csrc/ops.h): m (0 on a fully masked row) and
// 1 / l (0 there). row = (b * Hq + h) * Sq + i.
__device__ inline void store_row_softmax(const AttnParams& p, int64_t row, float m, float l) {
  p.lse[row] = m == INFINITY ? INFINITY : l == 0.f ? -INFINITY : m + logf(l);
  p.row_stats[row] = m == -INFINITY ? 0.f : m;
  p.row_stats[int64_t(p.B) * p.Hq * p.Sq + row] = l == 0.f ? 0.f : 1.f / l;
}

// ---- prefill --------------------------------------------------------------------------------

// Shared memory of one prefill block, in elements; rows padded so WMMA's 32-byte-aligned loads
// land on every 16-row fragment and consecutive rows start on different banks.
template <typename T, int Dp, int BLOCK_N, int WARPS>
struct PrefillSmem {
  static constexpr int BLOCK_M = 16 * WARPS;
  static constexpr int ldt = Dp + 16 / int(sizeof(T)) * 1;  // T rows: + 16 bytes
  static constexpr int lds = BLOCK_N + 4;                   // float score rows
  static constexpr int ldp = BLOCK_N + 16 / int(sizeof(T));  // probability rows (T)
  static constexpr int ldo = Dp + 4;                        // float output rows
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = q_off + sizeof(T) * BLOCK_M * ldt;
  static constexpr size_t v_off = k_off + sizeof(T) * BLOCK_N * ldt;
  static constexpr size_t s_off = v_off + sizeof(T) * BLOCK_N * ldt;
  static constexpr size_t p_off = s_off + sizeof(float) * BLOCK_M * lds;
  static constexpr size_t o_off = p_off + sizeof(T) * BLOCK_M * ldp;
  static constexpr size_t alpha_off = o_off + sizeof(float) * BLOCK_M * ldo;
  static constexpr size_t bytes = alpha_off + sizeof(float) * BLOCK_M;
  static_assert(k_off % 32 == 0 && v_off % 32 == 0 && s_off % 32 == 0 && p_off % 32 == 0 && o_off % 32 == 0,
                "WMMA needs 32-byte aligned tiles");
};

// rows x Dp tile of T at `dst` (row stride ld) <- rows [r0, r0 + rows) of a (.., S, D) head at
// `src` (row stride `stride`), zero past S and past D. 16-byte copies when `vec16`.
template <typename T, int Dp>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int64_t stride, int r0, int rows, int S,
                                          int D, bool vec16) {
  constexpr int kVec = 16 / sizeof(T);
  if (vec16) {  // D % kVec == 0, rows and the head start 16-byte aligned
    const int chunks = Dp / kVec;
    for (int c = threadIdx.x; c < rows * chunks; c += blockDim.x) {
      const int r = c / chunks, d = (c % chunks) * kVec;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (r0 + r < S && d < D) {
        LMFAST_CHECK_ALIGNED(src + (r0 + r) * stride + d, 16);
        val = *reinterpret_cast<const uint4*>(src + (r0 + r) * stride + d);
      }
      LMFAST_CHECK_ALIGNED(dst + r * ld + d, 16);
      *reinterpret_cast<uint4*>(dst + r * ld + d) = val;
    }
  } else {
    for (int c = threadIdx.x; c < rows * Dp; c += blockDim.x) {
      const int r = c / Dp, d = c % Dp;
      dst[r * ld + d] = (r0 + r < S && d < D) ? src[(r0 + r) * stride + d] : from_float<T>(0.f);
    }
  }
}

// The prefill kernel's query blocks per head: Sq / BLOCK_M, or under packed documents runs of
// one document each, at most one more per document (documents::document_run).
__host__ __device__ inline int prefill_query_blocks(const AttnParams& p, int block_m) {
  return p.doc_bands != nullptr ? p.Sq / block_m + p.n_docs : (p.Sq + block_m - 1) / block_m;
}

template <typename T, int Dp, int BLOCK_N, int WARPS>
__global__ void __launch_bounds__(32 * WARPS) attn_prefill_kernel(AttnParams p, bool vec16) {
  using L = PrefillSmem<T, Dp, BLOCK_N, WARPS>;
  constexpr int BLOCK_M = L::BLOCK_M;
  constexpr bool kTensorCores = !std::is_same_v<T, float>;
  LMFAST_DYNAMIC_SHARED(unsigned char, smem);
  T* Qs = reinterpret_cast<T*>(smem + L::q_off);
  T* Ks = reinterpret_cast<T*>(smem + L::k_off);
  T* Vs = reinterpret_cast<T*>(smem + L::v_off);
  float* Ss = reinterpret_cast<float*>(smem + L::s_off);
  T* Ps = reinterpret_cast<T*>(smem + L::p_off);
  float* Os = reinterpret_cast<float*>(smem + L::o_off);
  float* row_alpha = reinterpret_cast<float*>(smem + L::alpha_off);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // one block per (query block, head): consecutive blocks share a head's K and V in L2. Its rows
  // [m0, m_end); under packed documents a run of one document's (documents::document_run).
  const int q_blocks = prefill_query_blocks(p, BLOCK_M);
  int m0 = int(blockIdx.x % q_blocks) * BLOCK_M, m_end = min(m0 + BLOCK_M, p.Sq);
  if (p.doc_bands != nullptr) {
    const documents::Run run = documents::document_run(blockIdx.x % q_blocks, p.doc_bands + 2 * p.Sq, p.n_docs, BLOCK_M);
    m0 = int(run.start), m_end = int(run.end);  // (rows past m_end: computed, never written)
  }
  const int bh = int(blockIdx.x / q_blocks), b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hkv);
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1];

  load_tile<T, Dp>(Qs, L::ldt, q, p.q_strides[2], m0, BLOCK_M, p.Sq, p.D, vec16);
  for (int c = threadIdx.x; c < BLOCK_M * L::ldo; c += blockDim.x) Os[c] = 0.f;
  __syncthreads();  // (the tile loop may not run at all: every row fully masked)

  // This lane's softmax rows: 2 lanes per row, each half of the tile's columns.
  const int my_row = warp * 16 + lane / 2, half = lane & 1;
  const int qi = m0 + my_row;  // query index (may be >= Sq: computed, never written)
  float m_run = -INFINITY, l_run = 0.f;
  const uint32_t drop_key = dropout_row_key(p, b, h, qi);

  const int m_last = m_end - 1;
  const int key_lo = m_last >= m0 ? band_lo(p, m0) : 0, key_hi = m_last >= m0 ? band_hi(p, m_last) : 0;
  for (int j0 = (key_lo / BLOCK_N) * BLOCK_N; j0 < key_hi; j0 += BLOCK_N) {
    if (p.mask_kind == kBoolMask && !bool_mask_keeps_tile(p, b, h, m0, BLOCK_M, j0, BLOCK_N)) continue;
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile<T, Dp>(Ks, L::ldt, k, p.k_strides[2], j0, BLOCK_N, p.Sk, p.D, vec16);
    load_tile<T, Dp>(Vs, L::ldt, v, p.v_strides[2], j0, BLOCK_N, p.Sk, p.Dv, vec16);
    __syncthreads();

    // S (this warp's 16 rows x BLOCK_N) = Q K^T
    float* Sw = Ss + warp * 16 * L::lds;
    if constexpr (kTensorCores) {
      using namespace nvcuda;
      for (int nf = 0; nf < BLOCK_N / 16; ++nf) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < Dp / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kt;  // K^T: K rows as columns
          wmma::load_matrix_sync(a, Qs + warp * 16 * L::ldt + kk * 16, L::ldt);
          wmma::load_matrix_sync(kt, Ks + nf * 16 * L::ldt + kk * 16, L::ldt);
          wmma::mma_sync(acc, a, kt, acc);
        }
        wmma::store_matrix_sync(Sw + nf * 16, acc, L::lds, wmma::mem_row_major);
      }
    } else {
      // lane: row lane / 2, columns [half * BLOCK_N / 2, ...)
      const float* qr = reinterpret_cast<const float*>(Qs) + my_row * L::ldt;
      for (int c = half * (BLOCK_N / 2); c < (half + 1) * (BLOCK_N / 2); ++c) {
        const float* kr = reinterpret_cast<const float*>(Ks) + c * L::ldt;
        float acc = 0.f;
#pragma unroll 8
        for (int d = 0; d < Dp; ++d) acc = fmaf(qr[d], kr[d], acc);
        Sw[(lane / 2) * L::lds + c] = acc;
      }
    }
    __syncwarp();

    // online softmax over the tile, for this lane's half row
    float* srow = Sw + (lane / 2) * L::lds;
    float tile_max = -INFINITY;
    for (int c = half * (BLOCK_N / 2); c < (half + 1) * (BLOCK_N / 2); ++c) {
      // (j >= Sk lies outside the band; rows past Sq read no mask)
      const float s = qi < p.Sq ? masked_score<T>(p, srow[c], b, h, qi, j0 + c) : -INFINITY;
      srow[c] = s;
      tile_max = max_nan(tile_max, s);
    }
    tile_max = max_nan(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = max_nan(m_run, tile_max);
    const float alpha = exp_below(m_run, m_new);
    float psum = 0.f;
    T* prow = Ps + my_row * L::ldp;
    for (int c = half * (BLOCK_N / 2); c < (half + 1) * (BLOCK_N / 2); ++c) {
      const float pc = exp_below(srow[c], m_new);
      psum += pc;  // (l sums the undropped p)
      prow[c] = from_float<T>(kept(p, drop_key, j0 + c) ? pc : 0.f);
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    l_run = l_run * alpha + psum;
    m_run = m_new;
    if (half == 0) row_alpha[my_row] = alpha;
    __syncwarp();

    // O (this warp's rows) = alpha * O + P V
    float* Ow = Os + warp * 16 * L::ldo;
    for (int c = lane; c < 16 * Dp; c += 32) {
      const int r = c / Dp, d = c % Dp;
      Ow[r * L::ldo + d] *= row_alpha[warp * 16 + r];
    }
    __syncwarp();
    if constexpr (kTensorCores) {
      using namespace nvcuda;
      for (int df = 0; df < Dp / 16; ++df) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, Ow + df * 16, L::ldo, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
          wmma::load_matrix_sync(pa, Ps + warp * 16 * L::ldp + kk * 16, L::ldp);
          wmma::load_matrix_sync(vb, Vs + kk * 16 * L::ldt + df * 16, L::ldt);
          wmma::mma_sync(acc, pa, vb, acc);
        }
        wmma::store_matrix_sync(Ow + df * 16, acc, L::ldo, wmma::mem_row_major);
      }
    } else {
      const float* pr = reinterpret_cast<const float*>(Ps) + my_row * L::ldp;
      for (int d = half * (Dp / 2); d < (half + 1) * (Dp / 2); ++d) {
        float acc = Ow[(lane / 2) * L::ldo + d];
#pragma unroll 8
        for (int c = 0; c < BLOCK_N; ++c) acc = fmaf(pr[c], reinterpret_cast<const float*>(Vs)[c * L::ldt + d], acc);
        Ow[(lane / 2) * L::ldo + d] = acc;
      }
    }
    __syncwarp();
  }

  // o = O / l (0 on a fully masked row); lse and the row stats
  __syncwarp();
  if (half == 0) row_alpha[my_row] = l_run == 0.f ? 0.f : p.keep_scale / l_run;  // (NaN stays NaN)
  if (half == 0 && qi < m_end) store_row_softmax(p, (int64_t(b) * p.Hq + h) * p.Sq + qi, m_run, l_run);
  __syncwarp();
  T* o = static_cast<T*>(p.o);
  for (int c = lane; c < 16 * p.Dv; c += 32) {
    const int r = c / p.Dv, d = c % p.Dv, i = m0 + warp * 16 + r;
    if (i < m_end)
      o[((int64_t(b) * p.Sq + i) * p.Hq + h) * p.Dv + d] =
          from_float<T>(Os[(warp * 16 + r) * L::ldo + d] * row_alpha[warp * 16 + r]);
  }
}

// ---- decode ---------------------------------------------------------------------------------

// One block per (query row, head, key split). Groups of LANES lanes each take one key at a
// time, each lane holding EPL elements of q, k, v and o (VEC-wide loads); the block's groups
// merge their (max, sum, o) in shared memory and write them to the split's workspace row.
template <typename T, int Dp, int VEC>
__global__ void __launch_bounds__(128) attn_decode_kernel(AttnParams p, int keys_per_split, float* part_o,
                                                           float* part_ml) {
  constexpr int LANES = (Dp / VEC) < 32 ? (Dp / VEC) : 32;  // lanes per key
  constexpr int EPL = Dp / LANES;                          // elements per lane
  constexpr int GROUPS = 128 / LANES;                      // keys in flight per block
  __shared__ float sh_m[GROUPS], sh_l[GROUPS];
  __shared__ float sh_o[GROUPS][Dp];

  const int split = blockIdx.y, splits = gridDim.y;
  const int i = int(blockIdx.x % p.Sq), bh = int(blockIdx.x / p.Sq);
  const int b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hkv);
  constexpr int kGroupsPerWarp = 32 / LANES;
  const int grp = threadIdx.x / LANES, gl = threadIdx.x % LANES;
  const int d0 = gl * EPL;  // this lane's first element
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1] + int64_t(i) * p.q_strides[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1];

  float qv[EPL], ov[EPL];
#pragma unroll
  for (int e = 0; e < EPL; e += VEC) {
    float t[VEC];
    if (d0 + e < p.D) load_floats<T, VEC>(q + d0 + e, t);
    else
#pragma unroll
      for (int u = 0; u < VEC; ++u) t[u] = 0.f;
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
      qv[e + u] = t[u];
      ov[e + u] = 0.f;
    }
  }
  float m_run = -INFINITY, l_run = 0.f;
  const uint32_t drop_key = dropout_row_key(p, b, h, i);
  const int j_begin = max(split * keys_per_split, band_lo(p, i));
  const int j_end = min((split + 1) * keys_per_split, band_hi(p, i));
  // A warp's groups step together (their shuffles need every lane): group `sub` of the warp
  // takes key jw + sub, if there is one.
  const int sub = grp % kGroupsPerWarp;
  for (int jw = j_begin + (threadIdx.x / 32) * kGroupsPerWarp; jw < j_end; jw += GROUPS) {
    const int j = jw + sub;
    // A key a boolean mask hides (left padding of a batch, other documents) is not read at all:
    // its score would be -inf, its weight 0. (Its group still takes part in the shuffles.)
    const bool visible = j < j_end && !bool_masked(p, b, h, i, j);
    const T* kr = k + int64_t(j) * p.k_strides[2];
    const T* vr = v + int64_t(j) * p.v_strides[2];
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; e += VEC) {
      if (visible && d0 + e < p.D) {
        float t[VEC];
        load_floats<T, VEC>(kr + d0 + e, t);
#pragma unroll
        for (int u = 0; u < VEC; ++u) dot = fmaf(qv[e + u], t[u], dot);
      }
    }
#pragma unroll
    for (int o = LANES / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (!visible) continue;
    // the key joins the running state: (old state, weight 1 at max s) merged (row_math.h)
    const MergeFactors f = merge_factors(m_run, band_score<T>(p, dot, b, h, i, j));
    l_run = l_run * f.fa + f.fb;
    m_run = f.max;
    const float weight = kept(p, drop_key, j) ? f.fb : 0.f;  // (l: the undropped weight)
#pragma unroll
    for (int e = 0; e < EPL; e += VEC) {
      float t[VEC] = {};
      if (d0 + e < p.Dv) load_floats<T, VEC>(vr + d0 + e, t);
#pragma unroll
      for (int u = 0; u < VEC; ++u) ov[e + u] = ov[e + u] * f.fa + weight * t[u];
    }
  }
  // merge the groups: every group's state into shared memory, then one pass per element
  if (gl == 0) {
    sh_m[grp] = m_run;
    sh_l[grp] = l_run;
  }
#pragma unroll
  for (int e = 0; e < EPL; ++e) sh_o[grp][d0 + e] = ov[e];
  __syncthreads();
  float m = -INFINITY;
  for (int g = 0; g < GROUPS; ++g) m = max_nan(m, sh_m[g]);
  const int64_t row = (int64_t(b) * p.Hq + h) * p.Sq + i;  // (B, Hq, Sq) row
  float* out = part_o + (row * splits + split) * Dp;
  for (int d = threadIdx.x; d < Dp; d += blockDim.x) {
    float acc = 0.f;
    for (int g = 0; g < GROUPS; ++g) acc += exp_below(sh_m[g], m) * sh_o[g][d];
    out[d] = acc;
  }
  if (threadIdx.x == 0) {
    float l = 0.f;
    for (int g = 0; g < GROUPS; ++g) l += exp_below(sh_m[g], m) * sh_l[g];
    part_ml[(row * splits + split) * 2] = m;
    part_ml[(row * splits + split) * 2 + 1] = l;
  }
}

// One warp per (b, h, i) row: merges the row's splits into o (B, Sq, Hq, Dv), lse and row stats.
template <typename T>
__global__ void attn_combine_kernel(AttnParams p, int splits, int Dp, const float* __restrict__ part_o,
                                    const float* __restrict__ part_ml) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= int64_t(p.B) * p.Hq * p.Sq) return;
  const int i = int(row % p.Sq), h = int((row / p.Sq) % p.Hq), b = int(row / (int64_t(p.Sq) * p.Hq));
  const float* ml = part_ml + row * splits * 2;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = max_nan(m, ml[2 * s]);
  float l = 0.f;
  for (int s = 0; s < splits; ++s) l += exp_below(ml[2 * s], m) * ml[2 * s + 1];
  const float inv = l == 0.f ? 0.f : p.keep_scale / l;
  T* o = static_cast<T*>(p.o) + ((int64_t(b) * p.Sq + i) * p.Hq + h) * p.Dv;
  for (int d = lane; d < p.Dv; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += exp_below(ml[2 * s], m) * part_o[(row * splits + s) * Dp + d];
    o[d] = from_float<T>(acc * inv);
  }
  if (lane == 0) store_row_softmax(p, row, m, l);
}

// ---- launchers ---------------------------------------------------------------------------

template <typename T, int Dp, int BLOCK_N, int WARPS>
void launch_prefill(const AttnParams& p, bool vec16, cudaStream_t stream) {
  using L = PrefillSmem<T, Dp, BLOCK_N, WARPS>;
  auto kernel = attn_prefill_kernel<T, Dp, BLOCK_N, WARPS>;
  // Past 48 KiB of shared memory a kernel must opt in, once per device (not on every call:
  // decode-time host cost counts).
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (bit == 0 || !(configured.load(std::memory_order_relaxed) & bit)) {
    int optin = 0;
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
    if (L::bytes > size_t(optin))
      throw std::runtime_error("lmfast cuda attention: head dim " + std::to_string(std::max(p.D, p.Dv)) +
                               " in this dtype needs " + std::to_string(L::bytes) +
                               " bytes of shared memory per block, this GPU allows " + std::to_string(optin) +
                               "; use backend='triton'");
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(L::bytes)),
               "cudaFuncSetAttribute");
    configured.fetch_or(bit);
  }
  const int64_t blocks = int64_t(prefill_query_blocks(p, L::BLOCK_M)) * p.B * p.Hq;
  if (blocks >= (int64_t(1) << 31)) throw std::runtime_error("lmfast cuda attention: too many query blocks");
  launch(kernel, unsigned(blocks), 32 * WARPS, L::bytes, stream, p, vec16);
}

// The padded head dim: the smallest of 32, 64, 128, 256 that holds D and Dv.
int padded_head_dim(const AttnParams& p) {
  const int D = std::max(p.D, p.Dv);
  return D <= 32 ? 32 : D <= 64 ? 64 : D <= 128 ? 128 : 256;
}

template <typename T>
void run_prefill(const AttnParams& p, bool vec16, cudaStream_t stream) {
  const int Dp = padded_head_dim(p);
  if constexpr (std::is_same_v<T, float>) {  // float32 tiles are twice the size: smaller blocks
    if (Dp == 32) launch_prefill<T, 32, 64, 4>(p, vec16, stream);
    else if (Dp == 64) launch_prefill<T, 64, 64, 4>(p, vec16, stream);
    else if (Dp == 128) launch_prefill<T, 128, 32, 4>(p, vec16, stream);
    else launch_prefill<T, 256, 32, 2>(p, vec16, stream);
  } else {
    if (Dp == 32) launch_prefill<T, 32, 64, 4>(p, vec16, stream);
    else if (Dp == 64) launch_prefill<T, 64, 64, 4>(p, vec16, stream);
    else if (Dp == 128) launch_prefill<T, 128, 64, 4>(p, vec16, stream);
    else launch_prefill<T, 256, 32, 4>(p, vec16, stream);
  }
}

template <typename T, int Dp>
void launch_decode_dp(const AttnParams& p, bool vec16, int splits, int keys_per_split, float* part_o, float* part_ml,
                      cudaStream_t stream) {
  const dim3 grid(unsigned(int64_t(p.B) * p.Hq * p.Sq), unsigned(splits));
  if (vec16)
    launch(attn_decode_kernel<T, Dp, 16 / sizeof(T)>, grid, 128, 0, stream, p, keys_per_split, part_o, part_ml);
  else
    launch(attn_decode_kernel<T, Dp, 1>, grid, 128, 0, stream, p, keys_per_split, part_o, part_ml);
}

template <typename T>
void run_decode(const AttnParams& p, bool vec16, Workspace& workspace, cudaStream_t stream) {
  const int Dp = padded_head_dim(p);
  const int64_t rows = int64_t(p.B) * p.Hq * p.Sq;
  // Enough blocks for about four per SM, each split at least 64 keys.
  const int64_t want = ceil_div(int64_t(4) * multiprocessors(), rows);
  const int splits = int(std::max<int64_t>(1, std::min<int64_t>({want, ceil_div(p.Sk, 64), 65535})));
  const int keys_per_split = int(ceil_div(p.Sk, splits));
  float* po = static_cast<float*>(workspace.allocate(size_t(rows) * splits * Dp * sizeof(float)));
  float* pml = static_cast<float*>(workspace.allocate(size_t(rows) * splits * 2 * sizeof(float)));
  if (Dp == 32) launch_decode_dp<T, 32>(p, vec16, splits, keys_per_split, po, pml, stream);
  else if (Dp == 64) launch_decode_dp<T, 64>(p, vec16, splits, keys_per_split, po, pml, stream);
  else if (Dp == 128) launch_decode_dp<T, 128>(p, vec16, splits, keys_per_split, po, pml, stream);
  else launch_decode_dp<T, 256>(p, vec16, splits, keys_per_split, po, pml, stream);
  check_launch();
  launch(attn_combine_kernel<T>, unsigned(ceil_div(rows, 4)), 128, 0, stream, p, splits, Dp, po, pml);
}

// Query rows at or below which the decode kernel runs (it reads the keys once per row).
constexpr int kDecodeMaxRows = 4;

// Packed documents' table (../documents.h): thread i writes query row i's [lo, hi) to bands[i]
// and bands[Sq + i], and boundary i of cu_seqlens_q to bands[2 Sq + i]; block 0 also checks the
// boundaries (start at 0, never decrease, end at Sq and Sk) into the last entry: 1 when valid.
// Every read stays inside cu_q and cu_k, whatever their values (n_docs = 0 only with Sq = 0).
template <typename QIndex, typename KIndex>
__global__ void document_bands_kernel(const QIndex* __restrict__ cu_q, int64_t stride_q,
                                      const KIndex* __restrict__ cu_k, int64_t stride_k, int64_t n_docs, int64_t Sq,
                                      int64_t Sk, bool causal, int64_t window, int* __restrict__ bands) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i <= n_docs) {  // the boundaries, clamped to [0, Sq]: the prefill blocks' runs (documents::document_run)
    const int64_t c = int64_t(cu_q[i * stride_q]);
    bands[2 * Sq + i] = int(c < 0 ? 0 : c > Sq ? Sq : c);
  }
  if (i < Sq) {
    const int64_t d = documents::document_of(cu_q, stride_q, n_docs, i);
    const documents::RowBand band = documents::row_band(i, int64_t(cu_k[d * stride_k]), int64_t(cu_k[(d + 1) * stride_k]),
                                                        int64_t(cu_q[(d + 1) * stride_q]), Sk, causal, window);
    bands[i] = int(band.lo);
    bands[Sq + i] = int(band.hi);
  }
  if (blockIdx.x == 0) {  // (the whole block, or none: the vote below is a barrier)
    bool bad = threadIdx.x == 0 && (cu_q[0] != 0 || cu_k[0] != 0 || int64_t(cu_q[n_docs * stride_q]) != Sq ||
                                    int64_t(cu_k[n_docs * stride_k]) != Sk);
    for (int64_t d = threadIdx.x + 1; d <= n_docs; d += blockDim.x)
      bad = bad || cu_q[d * stride_q] < cu_q[(d - 1) * stride_q] || cu_k[d * stride_k] < cu_k[(d - 1) * stride_k];
    const int any_bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) bands[2 * Sq + n_docs + 1] = any_bad ? 0 : 1;
  }
}

}  // namespace

void launch_document_bands(const void* cu_q, bool q_int32, int64_t stride_q, const void* cu_k, bool k_int32,
                           int64_t stride_k, int64_t n_docs, int64_t Sq, int64_t Sk, bool causal, int64_t window,
                           int* bands, cudaStream_t stream) {
  auto run = [&]<typename QIndex, typename KIndex>() {
    launch(document_bands_kernel<QIndex, KIndex>, unsigned(ceil_div(std::max(Sq, n_docs + 1), 256)), 256, 0, stream,
           static_cast<const QIndex*>(cu_q), stride_q, static_cast<const KIndex*>(cu_k), stride_k, n_docs, Sq, Sk,
           causal, window, bands);
  };
  if (q_int32 && k_int32) run.template operator()<int32_t, int32_t>();
  else if (q_int32) run.template operator()<int32_t, int64_t>();
  else if (k_int32) run.template operator()<int64_t, int32_t>();
  else run.template operator()<int64_t, int64_t>();
  check_launch();
}

void launch_attention_fwd(const AttnParams& p, Dtype dtype, bool vec16, Workspace& workspace, cudaStream_t stream) {
  for_dtype(dtype, [&]<typename T>() {
    if (p.Sq <= kDecodeMaxRows) run_decode<T>(p, vec16, workspace, stream);
    else run_prefill<T>(p, vec16, stream);
  });
  check_launch();
}

}  // namespace lmfast::cuda
