// Flash attention (FlashAttention-2 algorithm) on the CPU, forward and backward.
//
// q: (B, Hq, Sq, D), k: (B, Hkv, Sk, D), v: (B, Hkv, Sk, Dv); query head h reads kv head
// h / (Hq / Hkv). Dv may differ from D (DeepSeek's multi-head latent attention): both
// directions take it as it is. The forward reads q, k, v through their strides (the head dim
// contiguous), so the transposed (B, S, H, D) projections models hand over need no copy, and
// writes o in (B, Sq, Hq, Dv) memory order, the layout models want back (as SDPA's CPU flash
// kernel does). The backward
// takes contiguous tensors. Scores are computed one (Bq x Bk) tile at a time and never materialized
// whole (the backward keeps a block of query rows of them, at most 4 MiB; 6 with a softcap):
//
//   forward, per query block, over key blocks:   s = scale * q k^T + mask (masked: -inf)
//       (with a softcap c: s = c tanh(scale * q k^T / c) + mask, Gemma 2's logit softcapping;
//       the backward then takes ds through the cap's derivative 1 - tanh^2, for dq and dk)
//       m' = max(m, rowmax s);  p = exp(s - m');  l = l e^(m - m') + rowsum p;
//       o = o e^(m - m') + p v;     finally o /= l,  lse = m + log l
//   backward, per query block, recomputing s and p = softmax(s) over every key the block sees:
//       dv += p^T do;  dp = do v^T;  delta = rowsum(p dp);  ds = p (dp - delta + dlse);
//       dq += scale ds k;  dk += scale ds^T q          (why not p = exp(s - lse): see "backward")
//   with few (batch, kv head) pairs, each pair's query blocks are split into chunks that sum
//   dk, dv into partials of their own, added up afterwards (see BackwardPlan)
//   dropout (see Dropout): p v and dv = p^T do take p with the dropped entries zeroed and the
//   rest scaled by 1 / (1 - dropout_p), dp is dropped likewise; l, lse and ds = p (...) keep p
//
// The tile products run on float (double for double inputs) tiles: full tiles of long queries
// on oneDNN's brgemm (tile_product), the rest as BLAS gemm calls (the sgemm_/dgemm_ that
// libtorch links: MKL on x86 wheels; at::addmm where that symbol is absent);
// 16-bit inputs are widened tile by tile, except bfloat16 on a CPU with AMX-BF16 or
// AVX512-BF16, whose long-query forward and backward run their products in bfloat16 on
// oneDNN's brgemm where the head dims are even (see "bfloat16 on brgemm" below). Position masking is
// bottom-right aligned: query i sits at key position p = i + Sk - Sq; causal keeps keys
// j <= p, a window w keeps j > p - w; with packed documents (cu_seqlens), each row's band lies
// in its document (../documents.h); whole tiles outside the band are skipped, and so are
// tiles a boolean mask drops whole (mask_drops_tile). A row with every key masked gives o = 0
// and lse = -inf.
#include "vec.h"  // first: selects the vector ISA

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <memory>
#include <string>
#include <optional>
#include <vector>

#include "../document_tables.h"
#include "../dropout_hash.h"
#include "../ops.h"

namespace lmfast::cpu {
namespace {

using at::Tensor;

constexpr int64_t kBlockQ = 128;   // query rows per task / tile
constexpr int64_t kBlockK = 256;   // keys per tile
// Tiles of at most kSmallRows rows (decoding: a kv head's few query rows) multiply by hand:
// a BLAS call costs ~1-2 us of its own, more than a 1 x 256 x 64 product.
constexpr int64_t kSmallRows = 8;

struct Geometry {
  int64_t B, Hq, Hkv, Sq, Sk, D;
  int64_t Dv;  // v's and o's head dim: the forward takes any (DeepSeek's MLA: D = 192, Dv = 128)
  int64_t group() const { return Hq / Hkv; }
};

// Element strides of a (B, H, S, D) tensor whose head dim is contiguous.
struct Rows {
  int64_t b, h, s;
  explicit Rows(const Tensor& t) : b(t.stride(0)), h(t.stride(1)), s(t.stride(2)) {}
  int64_t at(int64_t bi, int64_t hi, int64_t si) const { return bi * b + hi * h + si * s; }
};

// Where a kernel's tiles of consecutive query rows or keys begin: every `size` from 0, or, with
// packed documents, every `size` from each document's start, so that no tile holds two
// documents (whose pairs no query needs) and the tiles a block of rows sees begin at its
// document's first key. Tile t is [start[t], start[t + 1]).
struct Tiles {
  std::vector<int64_t> start;  // (count + 1): the last entry is the length
  int64_t count() const { return int64_t(start.size()) - 1; }
  int64_t begin(int64_t t) const { return start[t]; }
  int64_t end(int64_t t) const { return start[t + 1]; }
  int64_t size(int64_t t) const { return start[t + 1] - start[t]; }
  // The tile holding position j, for 0 <= j < length.
  int64_t of(int64_t j) const { return int64_t(std::upper_bound(start.begin(), start.end(), j) - start.begin()) - 1; }
};

// n positions in tiles of `size`, restarting at each boundary of `cuts` (cu_seqlens: 0, ..., n),
// or from 0 alone where `cuts` is empty. Empty documents add no tile.
Tiles make_tiles(int64_t n, int64_t size, const std::vector<int64_t>& cuts) {
  Tiles t;
  const std::vector<int64_t> whole{0, n};
  const std::vector<int64_t>& c = cuts.empty() ? whole : cuts;
  for (size_t d = 0; d + 1 < c.size(); ++d)
    for (int64_t j = c[d]; j < c[d + 1]; j += size) t.start.push_back(j);
  t.start.push_back(n);
  return t;
}

// The contiguous range [lo, hi) of keys that causal/window masking (and packed documents) lets
// query i see, and the cap on the scores inside it (prepare_row applies both).
struct KeyBand {
  bool causal;
  int64_t window;  // 0: none
  int64_t offset;  // Sk - Sq: key position of query 0
  int64_t Sk;
  double softcap;  // > 0: scores become softcap * tanh(s / softcap) before the mask; 0: none
  // Packed documents (../documents.h): each row's [lo, hi), with causal and window applied in
  // its document; (2, Sq) int32 (B = 1), or undefined.
  Tensor documents;
  const int32_t* doc_lo = nullptr;
  const int32_t* doc_hi = nullptr;
  std::vector<int64_t> cu_q, cu_k;  // the documents' boundaries (cu_seqlens), or empty

  // Tiles of query rows and of keys (Tiles), cut at the documents' boundaries where there are some.
  Tiles query_tiles(int64_t Sq, int64_t size) const { return make_tiles(Sq, size, cu_q); }
  Tiles key_tiles(int64_t size) const { return make_tiles(Sk, size, cu_k); }

  int64_t lo(int64_t i) const {
    if (doc_lo != nullptr) return doc_lo[i];
    return window > 0 ? std::max<int64_t>(0, i + offset - window + 1) : 0;
  }
  int64_t hi(int64_t i) const {
    if (doc_hi != nullptr) return doc_hi[i];
    return causal ? std::clamp<int64_t>(i + offset + 1, 0, Sk) : Sk;
  }
  // Whether some query sees fewer than all keys: then a block of queries skips key tiles.
  bool banded() const { return causal || window > 0 || doc_lo != nullptr; }
  // Whether tile [j0, j1) holds any key some query in [i0, i1) may see.
  bool tile_visible(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return j0 < hi(i1 - 1) && j1 > lo(i0);
  }
};

// Attention dropout: p = softmax(s) loses each entry with probability dropout_p and the rest are
// scaled by 1 / (1 - dropout_p); which entries, ../dropout_hash.h says (a hash of the seed, the
// row and the key, so the backward regenerates the forward's mask, whatever the tiling or the
// thread count). The forward drops from the weights of p v but not from the row sums l (nor
// lse); the backward uses the dropped p for dv and drops dp (dp = do v^T, then dp * keep /
// (1 - p)), after which ds = p (dp - delta) holds as without dropout (delta = rowsum(p dp) =
// rowsum(do o)).
struct Dropout {
  bool on = false;
  uint32_t threshold = 0;  // keep where hash >= threshold: floor(dropout_p * 2^32)
  uint64_t seed = 0;
  double keep_scale = 1;   // 1 / (1 - dropout_p)

  uint32_t row_key(int64_t row) const { return dropout::row_key(seed, static_cast<uint64_t>(row)); }
  // dst[c] = src[c] * scale where entry (row key rk, key j0 + c) is kept, else 0, c < n.
  // (A plain loop over uint32: the compiler vectorizes it.)
  template <typename T>
  void apply(T* dst, const T* src, int64_t n, uint32_t rk, int64_t j0, T scale) const {
    for (int64_t c = 0; c < n; ++c) dst[c] = dropout::kept(rk, j0 + c, threshold) ? src[c] * scale : T(0);
  }
  // p[c] = 0 where dropped, for bfloat16 p (kept entries unscaled), c < n.
  void zero_dropped(at::BFloat16* p, int64_t n, uint32_t rk, int64_t j0) const {
    uint16_t* bits16 = reinterpret_cast<uint16_t*>(p);  // bfloat16 0 is all zero bits
    for (int64_t c = 0; c < n; ++c) bits16[c] = dropout::kept(rk, j0 + c, threshold) ? bits16[c] : uint16_t(0);
  }
};

Dropout dropout_of(double p, const std::optional<Tensor>& seed) {
  TORCH_CHECK(p >= 0 && p < 1, "lmfast_C: dropout_p must be in [0, 1), got ", p);
  Dropout d;
  if (p == 0) return d;
  TORCH_CHECK(seed.has_value() && seed->device().is_cpu() && seed->scalar_type() == at::kLong && seed->numel() == 1,
              "lmfast_C: dropout_p > 0 needs dropout_seed, a CPU int64 tensor of one element");
  d.on = true;
  d.threshold = dropout::keep_threshold(p);
  d.seed = static_cast<uint64_t>(seed->item<int64_t>());
  d.keep_scale = 1.0 / (1.0 - p);
  return d;
}

// Where the mask values of query row (b, h, i) live; the mask is read through its strides
// (0 along broadcast dims), as in softmax.cpp.
template <typename mask_t>
struct MaskView {
  const mask_t* data = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  const mask_t* row(int64_t b, int64_t h, int64_t i) const {
    return data ? data + b * sb + h * sh + i * sq : nullptr;
  }
};

template <typename mask_t>
MaskView<mask_t> mask_view(const std::optional<Tensor>& mask) {
  MaskView<mask_t> m;
  if (!mask.has_value()) return m;
  m.data = mask->const_data_ptr<mask_t>();
  int64_t* s[4] = {&m.sb, &m.sh, &m.sq, &m.sk};
  for (int d = 0; d < 4; ++d) *s[d] = mask->size(d) == 1 ? 0 : mask->stride(d);
  return m;
}

// Whether any of n mask values, `stride` apart, is True.
inline bool any_kept(const bool* m, int64_t n, int64_t stride) {
  int64_t c = 0;
  if (stride == 1) {  // eight at a time (a bool is one byte, 0 or 1)
    for (; c + 8 <= n; c += 8) {
      uint64_t word;
      std::memcpy(&word, m + c, 8);
      if (word != 0) return true;
    }
  }
  for (; c < n; ++c)
    if (m[c * stride]) return true;
  return false;
}

// Whether a boolean mask keeps none of keys [j0, j0 + nk) for any of n query rows, each
// within its band; row_of(r) = (head, query) of row r. Such a tile (another document's keys in
// packed sequences, a padded stretch, a block-sparse pattern) is skipped whole: its scores
// would all be -inf, whatever q and k hold, so skipping changes no bit. Dense masks return at
// the first kept value. (Additive masks never skip: -inf + NaN must stay NaN, as the
// reference's does.)
template <typename mask_t, typename RowOf>
bool mask_drops_tile(const MaskView<mask_t>& mask, const KeyBand& band, int64_t b, int64_t n, const RowOf& row_of,
                     int64_t j0, int64_t nk) {
  if constexpr (!std::is_same_v<mask_t, bool>) {
    return false;
  } else {
    if (mask.data == nullptr) return false;
    for (int64_t r = 0; r < n; ++r) {
      const auto [h, i] = row_of(r);
      const int64_t lo = std::max(band.lo(i), j0), hi = std::min(band.hi(i), j0 + nk);
      if (lo < hi && any_kept(mask.row(b, h, i) + lo * mask.sk, hi - lo, mask.sk)) return false;
    }
    return true;
  }
}

// BLAS, as linked into libtorch (weak: a build whose torch exports no Fortran BLAS symbols
// falls back to at::addmm). Calling gemm directly instead of at::mm on from_blob views saves
// ~10 us of dispatch per tile product, 10-20% of a 128 x 256 x 64 tile's time.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

// Row-major C (m x n, leading dim ldc) = alpha op(A) op(B) + beta C, where op(A) is m x k (A
// stored m x k, or k x m when a_t) and op(B) is k x n (B stored k x n, or n x k when b_t).
// beta = 0 ignores C's old contents.
template <typename acc_t>
void gemm(bool b_t, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a,
          int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc, bool a_t = false) {
  if (m == 0 || n == 0) return;
  const bool blas_ok = k > 0;  // BLAS wants leading dims >= 1; k = 0 (D = 0) goes to addmm
  // Row-major C is column-major C^T = op(B)^T op(A)^T, and a row-major matrix read as
  // column-major is its transpose: so B goes first, each with its transpose flag as stored.
  const char ta = b_t ? 'T' : 'N', tb = a_t ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sgemm_ != nullptr && blas_ok) return sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else {
    if (dgemm_ != nullptr && blas_ok) return dgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  }
  const auto T = c10::CppTypeToScalarType<acc_t>::value;
  auto view = [&](const acc_t* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    Tensor v = at::from_blob(const_cast<acc_t*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(T));
    return t ? v.t() : v;
  };
  Tensor ct = view(c, m, n, ldc, false);
  ct.addmm_(view(a, a_t ? k : m, a_t ? m : k, lda, a_t), view(b, b_t ? n : k, b_t ? k : n, ldb, b_t), beta, alpha);
}

// Whether float tile products run on oneDNN's brgemm (tile_product); LMFAST_CPU_BRGEMM=0 turns
// it off, as it does for bfloat16 (bf16_attention_unit).
bool float_brgemm() {
  static const bool on = [] {
    const char* env = std::getenv("LMFAST_CPU_BRGEMM");
    return env == nullptr || std::string(env) != "0";
  }();
  return on;
}

// Row-major C (m x n, leading dim ldc) = A (m x k) B (k x n), plus C's old contents where
// add_c; no transposes, no alpha. Where `fixed_shape`, float goes to oneDNN's brgemm
// (cpublas::brgemm, which PyTorch's CPU flash attention uses): it reads A and B as stored,
// where sgemm copies (packs) both operands on every call, which took ~20% of MKL's time in the
// float backward (perf), and it ran a 128 x 256 x 64 product at 113 GFLOP/s a core against
// sgemm's 98 (AMD EPYC Zen 4, one thread, in cache). But brgemm JIT-compiles a kernel for each
// (shape, leading dims) a thread meets and keeps it for the thread's life (PyTorch's cache, ~30
// KiB a kernel, not ours to evict): products whose shape or leading dims follow the sequence
// length (edge tiles) grew it by every new length a process saw, 445 MiB over 256 prompt lengths
// (2 threads). So `fixed_shape` is for full tiles whose leading dims come from a small set (see
// key_stride); the rest, double, and LMFAST_CPU_BRGEMM=0 take gemm above. (Where oneDNN cannot,
// no AVX2 or mkldnn disabled, cpublas::brgemm calls a gemm itself.)
template <typename acc_t>
void tile_product(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                  acc_t* c, int64_t ldc, bool add_c, bool fixed_shape) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (fixed_shape && m > 0 && n > 0 && k > 0 && float_brgemm())
      return at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c, /*is_vnni=*/false);
  }
  gemm<acc_t>(false, m, n, k, acc_t(1), a, lda, b, ldb, add_c ? acc_t(1) : acc_t(0), c, ldc);
}

// C (m x n) = A (m x k) B^T, with B at hand both as its n rows (b, `ldb` apart) and as B^T
// (bT, k x n, `ldbT` apart). On fewer than kSmallRows rows sgemm multiplies by B's rows: MKL
// then takes dot-product kernels whose rounding error is about half that of the FMA-chain
// kernels (brgemm's, and MKL's own from 8 rows up; measured with K = 128, 192), and eager
// attention's q k^T gets them too: a 3-query backward on brgemm came out at 2.5x eager's
// error in dv. Those few rows cost little either way.
template <typename acc_t>
void product_with_rows(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                       const acc_t* bT, int64_t ldbT, acc_t* c, int64_t ldc, bool fixed_shape) {
  if (m < kSmallRows) return gemm<acc_t>(true, m, n, k, acc_t(1), a, lda, b, ldb, acc_t(0), c, ldc);
  tile_product(m, n, k, a, lda, bT, ldbT, c, ldc, false, fixed_shape);
}

// out (cols x rows, rows `ld_out` apart; default: contiguous) = X^T, X rows x cols with rows
// `ld` elements apart: the transposed operands tile_product takes instead of a transpose flag.
// In blocks of 16 rows, which stay in L1 while their columns are written out.
template <typename T>
void transpose_tile(const T* x, int64_t rows, int64_t cols, int64_t ld, T* out, int64_t ld_out = -1) {
  if (ld_out < 0) ld_out = rows;
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t r1 = std::min(rows, r0 + 16);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = r0; r < r1; ++r) out[c * ld_out + r] = x[r * ld + c];
  }
}

// A rows x D tile as acc_t, rows `ld` elements apart: the data itself when scalar_t == acc_t
// (leading dim `ld`), else widened into `buf` (leading dim D). Returns (pointer, leading dim).
template <typename scalar_t>
std::pair<const at::opmath_type<scalar_t>*, int64_t> load_tile(
    const scalar_t* src, int64_t rows, int64_t D, int64_t ld, std::vector<at::opmath_type<scalar_t>>& buf) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return {src, ld};
  } else {  // vector conversions (a scalar float16 conversion costs more than the products)
    buf.resize(rows * D);
    for (int64_t r = 0; r < rows; ++r) {
      for_each_chunk<Chunk<scalar_t>::kChunk>(D, [&](int64_t d, int64_t n) {
        Chunk<scalar_t>::load(src + r * ld + d, n).store_acc(buf.data() + r * D + d, n);
      });
    }
    return {buf.data(), D};
  }
}

// row[0, n) := c tanh(pre_scale row / c) (Gemma 2's logit softcapping, as its eager attention
// computes it: divide, tanh, multiply; pre_scale is the attention scale where the tile still
// lacks it, else 1); where cap_grad is given, cap_grad[0, n) := the derivative 1 - tanh^2,
// taken as (1 - t)(1 + t), which keeps its digits where t is near 1. The tanh is vec.h's
// softcap_tanh (within 2 ulp of the exact one in float32).
template <typename acc_t>
void softcap_row(acc_t* row, int64_t n, acc_t c, acc_t* cap_grad, acc_t pre_scale) {
  using Vec = Vectorized<acc_t>;
  const Vec c_v(c), one(acc_t(1)), pre_scale_v(pre_scale);
  for_each_chunk<Vec::size()>(n, [&](int64_t j, int64_t m) {
    const Vec t = softcap_tanh(Vec::loadu(row + j, m) * pre_scale_v / c_v);
    (t * c_v).store(row + j, m);
    if (cap_grad != nullptr) ((one - t) * (one + t)).store(cap_grad + j, m);
  });
}

// One row of a score tile (keys j0 .. j0 + nk of query i; pre_scale times it are the scaled
// scores: the bfloat16 paths' tiles come unscaled from brgemm, and scaling only the visible
// keys, in the same pass as the cap, saves them a pass): scales and caps the scores in the
// query's key band (band.softcap; cap_grad as in softcap_row, 0 outside the band), adds the
// mask and sets -inf outside the band or where a boolean mask is False. Returns the visible
// column range [lo, hi) of the row (empty: lo == hi).
template <typename acc_t, typename mask_t>
std::pair<int64_t, int64_t> prepare_row(acc_t* row, int64_t i, int64_t j0, int64_t nk,
                                        const KeyBand& band, const mask_t* m, int64_t m_stride,
                                        acc_t* cap_grad = nullptr, acc_t pre_scale = acc_t(1)) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t lo = std::clamp<int64_t>(band.lo(i) - j0, 0, nk);
  const int64_t hi = std::max(lo, std::clamp<int64_t>(band.hi(i) - j0, 0, nk));
  if (band.softcap > 0) {
    if (cap_grad != nullptr) {
      std::fill(cap_grad, cap_grad + lo, acc_t(0));
      std::fill(cap_grad + hi, cap_grad + nk, acc_t(0));
    }
    softcap_row(row + lo, hi - lo, static_cast<acc_t>(band.softcap), cap_grad == nullptr ? nullptr : cap_grad + lo,
                pre_scale);
  } else if (pre_scale != acc_t(1)) {
    for_each_chunk<Vec::size()>(hi - lo, [&](int64_t j, int64_t n) {
      (Vec::loadu(row + lo + j, n) * Vec(pre_scale)).store(row + lo + j, n);
    });
  }
  std::fill(row, row + lo, kNegInf);
  std::fill(row + hi, row + nk, kNegInf);
  if (m == nullptr) return {lo, hi};
  if constexpr (std::is_same_v<mask_t, bool>) {
    if (m_stride == 1) {
      const bool* mj = m + j0;
      int64_t a = lo, z = hi;  // narrowed past masked keys at either end (padding)
      while (a < z && !mj[a]) row[a++] = kNegInf;
      while (z > a && !mj[z - 1]) row[--z] = kNegInf;
      for (int64_t c = a; c < z; ++c) row[c] = mj[c] ? row[c] : kNegInf;  // branch-free: vectorizes
      return {a, z};
    }
    for (int64_t c = lo; c < hi; ++c)
      if (!m[(j0 + c) * m_stride]) row[c] = kNegInf;
  } else if (m_stride == 1) {
    for_each_chunk<Vec::size()>(hi - lo, [&](int64_t j, int64_t n) {
      (Vec::loadu(row + lo + j, n) + Chunk<mask_t>::load(m + j0 + lo + j, n).lo).store(row + lo + j, n);
    });
  } else {
    for (int64_t c = lo; c < hi; ++c) row[c] += acc_t(m[(j0 + c) * m_stride]);
  }
  return {lo, hi};
}

// row[c] := exp(row[c] - m) over [lo, hi) (0 elsewhere; -inf scores give 0), returns the sum.
template <typename acc_t>
acc_t exp_row(acc_t* row, int64_t nk, int64_t lo, int64_t hi, acc_t m) {
  using Vec = Vectorized<acc_t>;
  std::fill(row, row + lo, acc_t(0));
  std::fill(row + hi, row + nk, acc_t(0));
  const Vec m_v(m);
  Vec sum(0);
  for_each_chunk<Vec::size()>(hi - lo, [&](int64_t j, int64_t n) {
    const Vec p = softmax_exp(Vec::loadu(row + lo + j, n) - m_v);  // m >= every score here: <= 0
    p.store(row + lo + j, n);
    sum += Vec::set(Vec(0), p, n);
  });
  return hsum(sum);
}

// max(a, b), NaN if either is NaN. (std::max(-inf, NaN) is -inf: a NaN score would pass for
// a masked one, and its row would come out as zeros instead of NaN.)
template <typename T>
T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// max of row[lo, hi), NaN if any is NaN. Four independent maxima: one would chain every
// vector's max on the previous one (latency-bound, about 3x slower on a cache-resident tile).
template <typename acc_t>
acc_t max_row(const acc_t* row, int64_t lo, int64_t hi) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
  Vec m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
  int64_t j = lo;
  for (; j + 4 * V <= hi; j += 4 * V) {
    m0 = at::vec::maximum(m0, Vec::loadu(row + j));
    m1 = at::vec::maximum(m1, Vec::loadu(row + j + V));
    m2 = at::vec::maximum(m2, Vec::loadu(row + j + 2 * V));
    m3 = at::vec::maximum(m3, Vec::loadu(row + j + 3 * V));
  }
  for (; j + V <= hi; j += V) m0 = at::vec::maximum(m0, Vec::loadu(row + j));
  if (j < hi) m1 = at::vec::maximum(m1, Vec::set(neg_inf, Vec::loadu(row + j, hi - j), hi - j));
  return hmax(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
}

// The forward works on tiles of query rows that share one kv head, against a range of keys:
//   long queries  (group * Sq > kBlockQ): a block of consecutive queries of one head (128 or 256), all keys;
//   short queries (decoding, small prefills): every query of every head of a kv-head group
//                 (group * Sq rows), so K and V are read once per group, not once per head;
//                 the keys are split over tasks when (batch x kv heads) alone would not
//                 occupy the threads, and the splits' partial results are merged afterwards.
// A tile's rows are listed explicitly (head, query), so both shapes share one inner loop.
struct TileRows {
  std::vector<int64_t> head, query;  // query head and query index of each row
  int64_t size() const { return int64_t(head.size()); }
  void clear() { head.clear(); query.clear(); }
  void add(int64_t h, int64_t i) { head.push_back(h); query.push_back(i); }
};

// Online-softmax state of a tile: per row the running max m, the running sum l, and the
// unnormalized output acc (rows x Dv), over the keys seen so far.
template <typename acc_t>
struct TileState {
  std::vector<acc_t> m, l, acc;
  void reset(int64_t rows, int64_t D) {
    m.assign(rows, -std::numeric_limits<acc_t>::infinity());
    l.assign(rows, acc_t(0));
    acc.assign(rows * D, acc_t(0));
  }
};

// Buffers of one thread, sized to the largest tile it works on (uninitialized: every entry
// used is written first).
template <typename acc_t>
struct TileBuffers {
  std::vector<acc_t> s, q, k, v;  // scores (rows x kBlockK), scaled queries, widened K/V tiles
};

// s (R x nk, leading dim ld_s) = qt (R x D, contiguous) kt^T, with kt nk rows of D, ldk apart.
template <typename acc_t>
void small_scores(const acc_t* qt, int64_t R, const acc_t* kt, int64_t ldk, int64_t nk, int64_t D, acc_t* s,
                  int64_t ld_s) {
  using Vec = Vectorized<acc_t>;
  for (int64_t j = 0; j < nk; ++j) {
    const acc_t* kj = kt + j * ldk;
    for (int64_t r = 0; r < R; ++r) {  // R independent dot products: they overlap in the core
      const acc_t* qr = qt + r * D;
      Vec acc(0);
      for_each_chunk<Vec::size()>(D, [&](int64_t d, int64_t n) {
        acc = at::vec::fmadd(Vec::loadu(qr + d, n), Vec::loadu(kj + d, n), acc);  // tail lanes load as 0
      });
      s[r * ld_s + j] = hsum(acc);
    }
  }
}

// acc (R x D, contiguous) += p (R x nk, leading dim ld_s) vt, with vt nk rows of D, ldv apart.
// (D here is v's head dim, Dv.)
template <typename acc_t>
void small_pv(const acc_t* p, int64_t ld_s, int64_t R, const acc_t* vt, int64_t ldv, int64_t nk, int64_t D,
              acc_t* acc) {
  using Vec = Vectorized<acc_t>;
  for (int64_t j = 0; j < nk; ++j) {
    const acc_t* vj = vt + j * ldv;
    for (int64_t r = 0; r < R; ++r) {
      const Vec pj(p[r * ld_s + j]);
      acc_t* ar = acc + r * D;
      for_each_chunk<Vec::size()>(D, [&](int64_t d, int64_t n) {
        at::vec::fmadd(pj, Vec::loadu(vj + d, n), Vec::loadu(ar + d, n)).store(ar + d, n);
      });
    }
  }
}

// K^T of every (b, kv head), key tile by key tile, in acc_t: the B operand of the long-query
// forward's s = q k^T (tile_product), made once per kv head instead of once per query block
// that reads it. Tile t (keys [keys.begin(t), keys.end(t)), nk of them) of head bh is D x nk,
// contiguous. Full query blocks (block_q rows) against full tiles (block_k keys) multiply on
// brgemm; the edges, whose shapes follow the lengths, on gemm (tile_product).
template <typename acc_t>
struct TransposedKeys {
  Tiles keys;
  int64_t block_q = 0;
  int64_t D = 0;  // tile t of head bh starts at (bh * Sk + keys.begin(t)) * D: each takes its own keys' room
  int64_t Sk = 0;
  std::vector<acc_t> data;

  template <typename scalar_t>
  TransposedKeys(const scalar_t* k, const Geometry& g, const Rows& ks, Tiles key_tiles, int64_t block_q_)
      : keys(std::move(key_tiles)), block_q(block_q_), D(g.D), Sk(g.Sk),
        data(g.B * g.Hkv * g.Sk * g.D) {
    const int64_t tiles = keys.count();
    at::parallel_for(0, g.B * g.Hkv * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> wide;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t t = task % tiles, b = task / tiles / g.Hkv, hk = task / tiles % g.Hkv;
        const auto [kt, ldk] = load_tile(k + ks.at(b, hk, keys.begin(t)), keys.size(t), g.D, ks.s, wide);
        transpose_tile(kt, keys.size(t), g.D, ldk, data.data() + (task / tiles * Sk + keys.begin(t)) * D);
      }
    });
  }
  // The tile beginning at key j0 of head bh: (D x its keys, leading dim = its key count).
  std::pair<const acc_t*, int64_t> tile_at(int64_t bh, int64_t j0) const {
    const int64_t t = keys.of(j0);
    return {data.data() + (bh * Sk + keys.begin(t)) * D, keys.size(t)};
  }
};

// Attends the tile's rows to keys [j_begin, j_end) of kv head (b, hk), updating `st`. kT: K^T
// tile by tile (the long-query forward, whose key tiles j_begin steps through by block_k), or
// nullptr (the short-query forward: its tiles multiply k's rows as stored).
template <typename scalar_t, typename mask_t>
void attend_keys(const TileRows& rows, const scalar_t* q, const scalar_t* k,
                 const scalar_t* v, const MaskView<mask_t>& mask, const Geometry& g, const Rows& qs,
                 const Rows& ks, const Rows& vs, at::opmath_type<scalar_t> scale, const KeyBand& band, int64_t b,
                 int64_t hk, int64_t j_begin, int64_t j_end, int64_t block_k, const Dropout& drop,
                 TileState<at::opmath_type<scalar_t>>& st, TileBuffers<at::opmath_type<scalar_t>>& buf,
                 const TransposedKeys<at::opmath_type<scalar_t>>* kT = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t R = rows.size(), D = g.D, Dv = g.Dv;
  const int64_t i_lo = *std::min_element(rows.query.begin(), rows.query.end());
  const int64_t i_hi = *std::max_element(rows.query.begin(), rows.query.end()) + 1;
  // (scale q) as contiguous acc_t rows: the scale folded into q
  buf.q.resize(R * D);
  for (int64_t r = 0; r < R; ++r) {
    const scalar_t* src = q + qs.at(b, rows.head[r], rows.query[r]);
    for_each_chunk<Chunk<scalar_t>::kChunk>(D, [&](int64_t d, int64_t n) {
      auto c = Chunk<scalar_t>::load(src + d, n);
      c.lo = c.lo * Vec(scale);
      c.hi = c.hi * Vec(scale);
      c.store_acc(buf.q.data() + r * D + d, n);
    });
  }
  auto row_of = [&](int64_t r) { return std::pair<int64_t, int64_t>{rows.head[r], rows.query[r]}; };
  const int64_t ld_s = std::min(block_k, j_end - j_begin);
  if (int64_t(buf.s.size()) < R * ld_s) buf.s.resize(R * ld_s);
  const scalar_t* kh = k + ks.at(b, hk, 0);
  const scalar_t* vh = v + vs.at(b, hk, 0);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += block_k) {
    const int64_t nk = std::min(block_k, j_end - j0);
    if (!band.tile_visible(i_lo, i_hi, j0, j0 + nk)) continue;
    if (mask_drops_tile(mask, band, b, R, row_of, j0, nk)) continue;
    // s = (scale q) k^T
    // (a full block against a full tile: brgemm; its leading dims are block_k, D and v's row stride)
    const bool full = kT != nullptr && R == kT->block_q && nk == block_k && ld_s == block_k;
    if (full) {
      const auto [kt_t, ld_kt] = kT->tile_at(b * g.Hkv + hk, j0);
      tile_product(R, nk, D, buf.q.data(), D, kt_t, ld_kt, buf.s.data(), ld_s, false, true);
    } else {
      const auto [kt, ldk] = load_tile(kh + j0 * ks.s, nk, D, ks.s, buf.k);
      if (R <= kSmallRows) {
        small_scores(buf.q.data(), R, kt, ldk, nk, D, buf.s.data(), ld_s);
      } else {
        gemm<acc_t>(true, R, nk, D, 1, buf.q.data(), D, kt, ldk, 0, buf.s.data(), ld_s);
      }
    }
    // Online softmax, row by row: p = exp(s - m') in place; rescale acc and l by e^(m - m').
    for (int64_t r = 0; r < R; ++r) {
      acc_t* srow = buf.s.data() + r * ld_s;
      const int64_t i = rows.query[r];
      const auto [lo, hi] = prepare_row(srow, i, j0, nk, band, mask.row(b, rows.head[r], i), mask.sk);
      const acc_t m_new = max_nan(st.m[r], max_row(srow, lo, hi));
      if (m_new == kNegInf) {  // nothing visible yet: p = 0
        std::fill(srow, srow + nk, acc_t(0));
        continue;
      }
      const acc_t alpha = std::exp(st.m[r] - m_new);  // 0 when m was -inf
      st.l[r] = st.l[r] * alpha + exp_row(srow, nk, lo, hi, m_new);
      st.m[r] = m_new;
      if (drop.on)  // (l sums the undropped p; write_rows scales by 1 / (1 - dropout_p))
        drop.apply(srow + lo, srow + lo, hi - lo, drop.row_key((b * g.Hq + rows.head[r]) * g.Sq + i), j0 + lo, acc_t(1));
      if (alpha != acc_t(1)) {
        acc_t* orow = st.acc.data() + r * Dv;
        for_each_chunk<Vec::size()>(Dv, [&](int64_t j, int64_t n) {
          (Vec::loadu(orow + j, n) * Vec(alpha)).store(orow + j, n);
        });
      }
    }
    // acc += p v
    const auto [vt, ldv] = load_tile(vh + j0 * vs.s, nk, Dv, vs.s, buf.v);
    if (R <= kSmallRows) {
      small_pv(buf.s.data(), ld_s, R, vt, ldv, nk, Dv, st.acc.data());
    } else {
      tile_product(R, Dv, nk, buf.s.data(), ld_s, vt, ldv, st.acc.data(), Dv, true, full);
    }
  }
}

// ---- bfloat16 on brgemm (AMX-BF16 or AVX512-BF16) ---------------------------------------------
//
// Where the CPU multiplies bfloat16 natively (bf16_attention_unit: AMX-BF16's matrix units or
// AVX512-BF16's dot products), the long-query forward multiplies its bfloat16 tiles as they
// are, with float32 accumulation
// (at::native::cpublas::brgemm, which PyTorch's own CPU flash attention uses), instead of
// widening them for sgemm. brgemm takes its B operand in VNNI layout: B (K x N) stored as
// [K/2][N][2], the two rows of each pair interleaved. K^T and V are packed so once per kv head
// before the tiles are walked (each is read by every query block of every head of its group):
//   K tile (nk keys):  B = K^T (D x nk)   -> [D/2][nk][2]     one 32-bit word per (key, dim pair)
//   V tile (nk keys):  B = V   (nk x D)   -> [nke/2][D][2]    nke = nk rounded up to even (zero row)
// Scores come back in float32 (scaled afterwards, exactly); p is rounded to bfloat16 for p v, as
// SDPA's kernel does, while l sums the float32 p.

// Whether cpublas::brgemm multiplies bfloat16 natively: one 2 x 16 x 4 product with B in VNNI
// layout, against its exact answer. (Where oneDNN's brgemm cannot run bfloat16, cpublas falls
// back to a plain gemm that reads B as not packed, and the answer differs.)
bool brgemm_bf16_computes_vnni() {
  constexpr int64_t M = 2, N = 16, K = 4;
  at::BFloat16 a[M * K], b_vnni[K * N];  // B (K x N) as [K/2][N][2]
  float c[M * N], want[M * N] = {};
  auto b_at = [](int64_t k, int64_t n) { return float((k * 7 + n * 3) % 11) - 5.f; };  // small ints: exact
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) a[m * K + k] = at::BFloat16(float(m * K + k + 1));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b_vnni[(k / 2) * 2 * N + n * 2 + k % 2] = at::BFloat16(b_at(k, n));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) want[m * N + n] += float(a[m * K + k]) * b_at(k, n);
  at::native::cpublas::brgemm(M, N, K, K, N, N, false, a, b_vnni, c, true);
  at::native::cpublas::brgemm_release(true);
  return std::equal(c, c + M * N, want);
}

// Whether bfloat16 tiles go to brgemm (above), forward and backward: a native unit, and even,
// nonzero head dims (VNNI packs pairs of rows along a product's K dim: D for q k^T, Dv for
// do v^T; oneDNN's brgemm fails on a zero-width product).
inline bool use_bf16_brgemm(const Geometry& g) {
  static const bool native = std::string(bf16_attention_unit()) != "sgemm";
  return native && g.D % 2 == 0 && g.D > 0 && g.Dv % 2 == 0 && g.Dv > 0;
}

// K and V of every (b, kv head), packed tile by tile (key tiles `keys`, each at most block_k
// long, its keys padded to a multiple of kPaddedKeys); tile t of head bh starts at key
// bh * head_keys + tile_key[t] (padded_tile_starts).
struct PackedKV {
  int64_t block_k = 0, tiles = 0, D = 0, Dv = 0, head_keys = 0;
  Tiles keys;
  std::vector<int64_t> tile_key;
  std::vector<at::BFloat16> k, v;
  int64_t first_key(int64_t bh, int64_t t) const { return bh * head_keys + tile_key[t]; }  // of tile t, in k and v
  const at::BFloat16* k_tile(int64_t bh, int64_t t) const { return k.data() + first_key(bh, t) * D; }
  const at::BFloat16* v_tile(int64_t bh, int64_t t) const { return v.data() + first_key(bh, t) * Dv; }
};

// B = X^T (D x n) in VNNI layout [D/2][n_out][2], from n rows of X (D each, `ld` apart): one
// 32-bit word per (row, pair of dims), a transpose of words. (D even; n_out >= n, default n:
// the words of columns [n, n_out) are left as they are.)
void pack_transposed(const at::BFloat16* x, int64_t n, int64_t D, int64_t ld, at::BFloat16* out, int64_t n_out = -1) {
  if (n_out < 0) n_out = n;
  auto* words = reinterpret_cast<uint32_t*>(out);
  for (int64_t j = 0; j < n; ++j) {
    const auto* row = reinterpret_cast<const uint32_t*>(x + j * ld);
    for (int64_t i = 0; i < D / 2; ++i) words[i * n_out + j] = row[i];
  }
}

// The bfloat16 products on brgemm (forward and backward) take their shapes from a small set,
// since brgemm keeps a compiled kernel for each shape and leading dims it meets (tile_product):
// a tile's rows rounded up to a multiple of 16, its keys to a multiple of 32 (at most the block
// sizes, 128 or 256), the padding zeros: at most 16 x 8 shapes of each product (~30 KiB a
// kernel, per thread), and ~3% more work at 300 tokens (by 32 and 64: 14%). Exact sizes grew
// the cache by ~0.35 MiB every new sequence length (2 threads), forward and backward alike.
constexpr int64_t kPaddedRows = 16, kPaddedKeys = 32;
constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Where each key tile starts in a head's packed operands, its keys padded to a multiple of
// kPaddedKeys: tile t at key start[t], start[count] keys a head. Each tile takes its own
// keys' room, not a full tile's: packed documents make a tile of every short document (32
// sequences of 8 keys took 32 x 256 keys a head, 9 MiB zeroed on fresh pages each call).
std::vector<int64_t> padded_tile_starts(const Tiles& keys) {
  std::vector<int64_t> start(keys.count() + 1, 0);
  for (int64_t t = 0; t < keys.count(); ++t) start[t + 1] = start[t] + round_up(keys.size(t), kPaddedKeys);
  return start;
}

// B = X (n x D) in VNNI layout [ne/2][D][2], ne = n rounded up to even (a zero row pairs with
// an odd last row), from n rows of X (`ld` apart): rows 2i and 2i + 1 interleaved.
void pack_rows(const at::BFloat16* x, int64_t n, int64_t D, int64_t ld, at::BFloat16* out) {
  for (int64_t jp = 0; jp < (n + 1) / 2; ++jp) {
    const at::BFloat16* r0 = x + 2 * jp * ld;
    const bool has_r1 = 2 * jp + 1 < n;
    at::BFloat16* o = out + jp * 2 * D;
    for (int64_t d = 0; d < D; ++d) {
      o[2 * d] = r0[d];
      o[2 * d + 1] = has_r1 ? r0[ld + d] : at::BFloat16(0.f);
    }
  }
}

// out[j] = x[j] rounded to bfloat16 (nearest even), n values: ATen's vectorized conversion.
void round_row(const float* x, at::BFloat16* out, int64_t n) {
  using C = Chunk<at::BFloat16>;
  for_each_chunk<C::kChunk>(n, [&](int64_t j, int64_t len) { C::load_acc(x + j, len).store(out + j, len); });
}

// Two rows rounded to bfloat16 and interleaved, out[2j] = r0[j], out[2j + 1] = r1[j] (r1 null:
// 0): the bfloat16 backward's packing of p and ds. With AVX512 it takes AVX512-BF16's
// conversion, 16 values an instruction (every CPU on the brgemm path has it: see
// exp_row_to_bf16; it flushes denormals to zero, which the scalar conversion keeps).
#if defined(CPU_CAPABILITY_AVX512)
__attribute__((target("avx512bf16"))) void interleave_rows(const float* r0, const float* r1, at::BFloat16* out,
                                                            int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 keep = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 x0 = _mm512_maskz_loadu_ps(keep, r0 + j);
    const __m512 x1 = r1 != nullptr ? _mm512_maskz_loadu_ps(keep, r1 + j) : _mm512_setzero_ps();
    // one 32-bit word per column: r1's bfloat16 above r0's
    const __m512i lo = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x0)));
    const __m512i hi = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x1)));
    _mm512_mask_storeu_epi32(out + 2 * j, keep, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}
#else
void interleave_rows(const float* r0, const float* r1, at::BFloat16* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    out[2 * j] = at::BFloat16(r0[j]);
    out[2 * j + 1] = at::BFloat16(r1 != nullptr ? r1[j] : 0.f);
  }
}
#endif

// pack_rows of a float32 tile (n rows of m, `ld` apart), rounded to bfloat16 and padded with
// zeros to n_out rows (even, >= n) and m_out columns (>= m): [n_out/2][m_out][2].
void pack_rows_rounded(const float* x, int64_t n, int64_t m, int64_t ld, at::BFloat16* out, int64_t n_out,
                       int64_t m_out) {
  const at::BFloat16 zero(0.f);
  for (int64_t jp = 0; jp < n_out / 2; ++jp) {
    at::BFloat16* o = out + jp * 2 * m_out;
    if (2 * jp >= n) {
      std::fill(o, o + 2 * m_out, zero);
      continue;
    }
    const float* r0 = x + 2 * jp * ld;
    interleave_rows(r0, 2 * jp + 1 < n ? r0 + ld : nullptr, o, m);
    std::fill(o + 2 * m, o + 2 * m_out, zero);
  }
}

// X^T (D x n_out) of n rows of X (D each, contiguous), zeros in columns [n, n_out).
void transpose_rows(const at::BFloat16* x, int64_t n, int64_t D, at::BFloat16* out, int64_t n_out) {
  transpose_tile(x, n, D, D, out, n_out);
  for (int64_t d = 0; d < D; ++d) std::fill(out + d * n_out + n, out + (d + 1) * n_out, at::BFloat16(0.f));
}

// n_out rows of X (D each, contiguous) as a product's A operand: X itself where n = n_out, else
// its n rows copied into `buf` and followed by zero rows.
const at::BFloat16* padded_rows(const at::BFloat16* x, int64_t n, int64_t n_out, int64_t D,
                                std::vector<at::BFloat16>& buf) {
  if (n == n_out) return x;
  buf.resize(n_out * D);
  std::copy(x, x + n * D, buf.begin());
  std::fill(buf.begin() + n * D, buf.begin() + n_out * D, at::BFloat16(0.f));
  return buf.data();
}

PackedKV pack_kv(const at::BFloat16* k, const at::BFloat16* v, const Geometry& g, const Rows& ks, const Rows& vs,
                 const Tiles& keys, int64_t block_k) {
  PackedKV p;
  p.block_k = block_k;
  p.keys = keys;
  p.tiles = keys.count();
  p.D = g.D, p.Dv = g.Dv;
  p.tile_key = padded_tile_starts(keys);
  p.head_keys = p.tile_key.back();
  p.k.resize(g.B * g.Hkv * p.head_keys * g.D);
  p.v.resize(g.B * g.Hkv * p.head_keys * g.Dv);
  at::parallel_for(0, g.B * g.Hkv * p.tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % p.tiles, bh = task / p.tiles, b = bh / g.Hkv, hk = bh % g.Hkv;
      const int64_t j0 = keys.begin(t), nk = keys.size(t);
      // K^T (D x round_up(nk, kPaddedKeys)) and V (that many rows): zeros past key nk (resize)
      pack_transposed(k + ks.at(b, hk, j0), nk, g.D, ks.s, p.k.data() + p.first_key(bh, t) * g.D,
                      round_up(nk, kPaddedKeys));
      pack_rows(v + vs.at(b, hk, j0), nk, g.Dv, vs.s, p.v.data() + p.first_key(bh, t) * g.Dv);
    }
  });
  return p;
}

// p[lo, hi) = exp(mul * s - m) rounded to bfloat16 (0 elsewhere in [0, n)); returns the sum
// of the unrounded p, which l accumulates. `store` writes one chunk of bfloat16.
// (A plain loop, not for_each_chunk: a lambda would not inherit the caller's target ISA.)
#define LMFAST_EXP_ROW_TO_BF16_BODY(store_chunk)                                   \
  using Vec = Vectorized<float>;                                                   \
  constexpr int64_t kChunkLen = 2 * Vec::size();                                   \
  std::fill(p, p + lo, at::BFloat16(0.f));                                         \
  std::fill(p + hi, p + n, at::BFloat16(0.f));                                     \
  const Vec mul_v(mul), neg_m(-m);                                                 \
  Vec sum(0);                                                                      \
  for (int64_t j = lo; j < hi; j += kChunkLen) {                                   \
    const int64_t len = std::min(kChunkLen, hi - j);                               \
    Chunk<at::BFloat16> c = Chunk<at::BFloat16>::load_acc(s + j, len);             \
    c.lo = softmax_exp(at::vec::fmadd(c.lo, mul_v, neg_m));                   \
    c.hi = softmax_exp(at::vec::fmadd(c.hi, mul_v, neg_m));                   \
    c = c.keep_first(len, 0.f);                                                    \
    sum += c.lo + c.hi;                                                            \
    store_chunk;                                                                   \
  }                                                                                \
  return hsum(sum);

#if defined(CPU_CAPABILITY_AVX512)
// Every CPU that takes the brgemm path has AVX512-BF16 (bf16_attention_unit: CPUs with
// AMX-BF16 all have it), which converts a chunk in one instruction (rounding to nearest even,
// as ATen's conversion does).
__attribute__((target("avx512bf16"))) float exp_row_to_bf16(const float* s, at::BFloat16* p, int64_t n,
                                                             int64_t lo, int64_t hi, float mul, float m) {
  LMFAST_EXP_ROW_TO_BF16_BODY({
    const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(__m512(c.hi), __m512(c.lo)));
    if (len == kChunkLen) {
      _mm512_storeu_si512(p + j, packed);
    } else {
      _mm512_mask_storeu_epi16(p + j, (__mmask32)((uint64_t(1) << len) - 1), packed);
    }
  })
}
#else
float exp_row_to_bf16(const float* s, at::BFloat16* p, int64_t n, int64_t lo, int64_t hi, float mul, float m) {
  LMFAST_EXP_ROW_TO_BF16_BODY(c.store(p + j, len))
}
#endif
#undef LMFAST_EXP_ROW_TO_BF16_BODY

// attend_keys for bfloat16 tiles on brgemm: the tile's rows against every key tile
// of kv head (b, hk), from the packed K/V.
template <typename mask_t>
void attend_keys_packed(const TileRows& rows, const at::BFloat16* q, const MaskView<mask_t>& mask,
                        const Geometry& g, const Rows& qs, float scale, const KeyBand& band, int64_t b, int64_t hk,
                        const PackedKV& kv, const Dropout& drop, TileState<float>& st, std::vector<float>& s_buf,
                        std::vector<at::BFloat16>& q_buf, std::vector<at::BFloat16>& p_buf) {
  using Vec = Vectorized<float>;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t R = rows.size(), D = g.D, Dv = g.Dv, bh = b * g.Hkv + hk;
  const int64_t i_lo = rows.query.front(), i_hi = rows.query.back() + 1;  // consecutive queries of one head
  // The products run on R_pad rows and on each tile's keys rounded up (kPaddedRows, kPaddedKeys):
  // rows [R, R_pad) of q, p and acc are zeros, and so are p's columns past a tile's keys.
  const int64_t R_pad = round_up(R, kPaddedRows);
  q_buf.resize(R_pad * D);
  std::fill(q_buf.begin() + R * D, q_buf.end(), at::BFloat16(0.f));
  for (int64_t r = 0; r < R; ++r) {
    const at::BFloat16* src = q + qs.at(b, rows.head[r], rows.query[r]);
    std::copy(src, src + D, q_buf.data() + r * D);
  }
  st.acc.resize(R_pad * Dv, 0.f);
  auto row_of = [&](int64_t r) { return std::pair<int64_t, int64_t>{rows.head[r], rows.query[r]}; };
  const int64_t ld_s = round_up(kv.block_k, kPaddedKeys);
  s_buf.resize(R_pad * ld_s);
  p_buf.resize(R_pad * ld_s);  // (rows < R: written over each tile's nk_pad keys before its p v)
  std::fill(p_buf.begin() + R * ld_s, p_buf.end(), at::BFloat16(0.f));
  for (int64_t t = 0; t < kv.tiles; ++t) {
    const int64_t j0 = kv.keys.begin(t), nk = kv.keys.size(t), nk_pad = round_up(nk, kPaddedKeys);
    if (!band.tile_visible(i_lo, i_hi, j0, j0 + nk)) continue;
    if (mask_drops_tile(mask, band, b, R, row_of, j0, nk)) continue;
    // s = q k^T (R x nk, float32; R_pad x nk_pad computed)
    at::native::cpublas::brgemm(R_pad, nk_pad, D, D, nk_pad, ld_s, false, q_buf.data(), kv.k_tile(bh, t), s_buf.data(),
                                true);
    for (int64_t r = 0; r < R; ++r) {
      float* srow = s_buf.data() + r * ld_s;
      const int64_t i = rows.query[r];
      const mask_t* mrow = mask.row(b, rows.head[r], i);
      // The row's max over the visible keys, and p = exp(mul * s - m'): without a mask (and
      // scale > 0, no softcap) the raw s is only read, max(scale s) = scale max(s); else s is
      // scaled, capped and masked in place first.
      int64_t lo = std::clamp<int64_t>(band.lo(i) - j0, 0, nk);
      int64_t hi = std::max(lo, std::clamp<int64_t>(band.hi(i) - j0, 0, nk));
      float mul = scale, row_max;
      if (mrow == nullptr && scale > 0.f && band.softcap == 0) {
        row_max = lo < hi ? max_row(srow, lo, hi) * scale : kNegInf;
      } else {
        std::tie(lo, hi) = prepare_row(srow, i, j0, nk, band, mrow, mask.sk, static_cast<float*>(nullptr), scale);
        row_max = max_row(srow, lo, hi);
        mul = 1.f;
      }
      const float m_new = max_nan(st.m[r], row_max);
      at::BFloat16* prow = p_buf.data() + r * ld_s;
      if (m_new == kNegInf || lo >= hi) {  // nothing visible here: p = 0
        std::fill(prow, prow + nk_pad, at::BFloat16(0.f));
        continue;
      }
      const float alpha = std::exp(st.m[r] - m_new);  // 0 when m was -inf
      st.l[r] = st.l[r] * alpha + exp_row_to_bf16(srow, prow, nk_pad, lo, hi, mul, m_new);
      st.m[r] = m_new;
      if (drop.on) drop.zero_dropped(prow + lo, hi - lo, drop.row_key((b * g.Hq + rows.head[r]) * g.Sq + i), j0 + lo);
      if (alpha != 1.f) {
        float* orow = st.acc.data() + r * Dv;
        for_each_chunk<Vec::size()>(Dv, [&](int64_t j, int64_t n) { (Vec::loadu(orow + j, n) * Vec(alpha)).store(orow + j, n); });
      }
    }
    // acc += p v (R x Dv, float32; R_pad x Dv computed)
    at::native::cpublas::brgemm(R_pad, Dv, nk_pad, ld_s, Dv, Dv, true, p_buf.data(), kv.v_tile(bh, t), st.acc.data(),
                                true);
  }
}

// o = acc / l (0 for fully masked rows), times 1 / (1 - dropout_p); lse = m + log(l);
// row_stats (2 x B * Hq * Sq, csrc/ops.h): m (0 on a fully masked row) and 1 / l (0 there).
template <typename scalar_t>
void write_rows(const TileRows& rows, const TileState<at::opmath_type<scalar_t>>& st,
                const Geometry& g, int64_t b, const Rows& os, scalar_t* o, at::opmath_type<scalar_t>* lse,
                at::opmath_type<scalar_t>* row_stats, const Dropout& drop) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t keep_scale = static_cast<acc_t>(drop.keep_scale);
  for (int64_t r = 0; r < rows.size(); ++r) {
    const int64_t h = rows.head[r], i = rows.query[r];
    const acc_t inv = st.l[r] == 0 ? acc_t(0) : keep_scale / st.l[r];  // (a NaN l stays NaN)
    const acc_t* orow = st.acc.data() + r * g.Dv;
    scalar_t* out = o + os.at(b, h, i);
    for_each_chunk<Chunk<scalar_t>::kChunk>(g.Dv, [&](int64_t d, int64_t n) {
      auto c = Chunk<scalar_t>::load_acc(orow + d, n);
      c.lo = c.lo * Vectorized<acc_t>(inv);
      c.hi = c.hi * Vectorized<acc_t>(inv);
      c.store(out + d, n);
    });
    // logsumexp: -inf on a fully masked row, +inf where a score is +inf (l is NaN there)
    constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
    const int64_t row = (b * g.Hq + h) * g.Sq + i;
    lse[row] = st.m[r] == kInf ? kInf : st.l[r] == 0 ? -kInf : st.m[r] + std::log(st.l[r]);
    row_stats[row] = st.m[r] == -kInf ? acc_t(0) : st.m[r];
    row_stats[g.B * g.Hq * g.Sq + row] = st.l[r] == 0 ? acc_t(0) : acc_t(1) / st.l[r];
  }
}

// The forward's task shapes (see attention_fwd_kernel): fixed numbers, not read from the thread
// count, since the split of the work decides the rounding and results must not change with
// torch.set_num_threads. They suit up to ~16 threads; more threads idle on mid-size shapes.
constexpr int64_t kTasksFor256 = 64;    // long queries: tasks needed before 256-row query blocks
constexpr int64_t kSplitTasks = 32;     // short queries: tasks the key splits aim at
constexpr int64_t kMinSplitKeys = 128;  // short queries: keys per split, at least

template <typename scalar_t, typename mask_t>
void attention_fwd_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* o,
                          at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* row_stats,
                          const MaskView<mask_t>& mask,
                          const Geometry& g, const Rows& qs, const Rows& ks, const Rows& vs, const Rows& os,
                          double scale_d, const KeyBand& band, const Dropout& drop) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t group = g.group();

  if (g.Sq * group > kBlockQ) {  // long queries: one task per (b, h, query block)
    // Query blocks of 256 rows where that still makes kTasksFor256 tasks (larger products run
    // closer to the BLAS's peak), else 128. Key tiles twice as long; with a causal or window
    // band, as long as a query block: only the tiles on the band's edges are partly masked,
    // and a query block skips the rest whole. The tiling follows the shape alone, not the
    // thread count, so results are the same bits for any torch.set_num_threads.
    // With packed documents, query blocks and key tiles start at each document's start (Tiles).
    const int64_t block_q = g.B * g.Hq * ((g.Sq + 255) / 256) >= kTasksFor256 ? 256 : kBlockQ;
    const Tiles q_tiles = band.query_tiles(g.Sq, block_q);
    const int64_t q_blocks = q_tiles.count();
    const int64_t block_k = band.banded() ? block_q : 2 * block_q;
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (use_bf16_brgemm(g)) {
        // Square tiles (256 x 256 where there are enough tasks) measured best on AMX, causal or
        // not: its products are ~7x faster than sgemm's, and the per-tile softmax work remains.
        // (Not re-tuned for AVX512-BF16, whose products are ~2.5x sgemm's.)
        const int64_t kPackedBlockK = block_q;
        const int64_t packed_q_blocks = q_blocks;
        const PackedKV kv = pack_kv(k, v, g, ks, vs, band.key_tiles(kPackedBlockK), kPackedBlockK);
        at::parallel_for(0, g.B * g.Hq * packed_q_blocks, 1, [&](int64_t begin, int64_t end) {
          TileRows rows;
          TileState<float> st;
          std::vector<float> s_buf;
          std::vector<at::BFloat16> q_buf, p_buf;
          for (int64_t task = begin; task < end; ++task) {
            const int64_t qb = task % packed_q_blocks, h = (task / packed_q_blocks) % g.Hq, b = task / (packed_q_blocks * g.Hq);
            rows.clear();
            for (int64_t i = q_tiles.begin(qb); i < q_tiles.end(qb); ++i) rows.add(h, i);
            st.reset(rows.size(), g.Dv);
            attend_keys_packed(rows, q, mask, g, qs, scale, band, b, h / group, kv, drop, st, s_buf, q_buf, p_buf);
            write_rows(rows, st, g, b, os, o, lse, row_stats, drop);
          }
          at::native::cpublas::brgemm_release(true);  // this thread's AMX tile state
        });
        return;
      }
    }
    const Tiles k_tiles = band.key_tiles(block_k);
    // K^T for the full blocks' products against full tiles, where there are both
    auto has_full = [](const Tiles& tiles, int64_t size) {
      for (int64_t t = 0; t < tiles.count(); ++t)
        if (tiles.size(t) == size) return true;
      return false;
    };
    std::optional<TransposedKeys<acc_t>> kT;
    if (has_full(q_tiles, block_q) && has_full(k_tiles, block_k)) kT.emplace(k, g, ks, k_tiles, block_q);
    at::parallel_for(0, g.B * g.Hq * q_blocks, 1, [&](int64_t begin, int64_t end) {
      TileRows rows;
      TileState<acc_t> st;
      TileBuffers<acc_t> buf;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t qb = task % q_blocks, h = (task / q_blocks) % g.Hq, b = task / (q_blocks * g.Hq);
        const int64_t i0 = q_tiles.begin(qb), i1 = q_tiles.end(qb);
        rows.clear();
        for (int64_t i = i0; i < i1; ++i) rows.add(h, i);
        st.reset(rows.size(), g.Dv);
        // Keys from tile 0 (tiles outside the band skipped); with documents, from the first tile
        // of the block's one document that it sees, to the last key it sees.
        int64_t j_begin = 0, j_end = g.Sk;
        if (!band.cu_k.empty()) {
          const int64_t lo = band.lo(i0), hi = band.hi(i1 - 1);
          j_begin = lo < hi ? k_tiles.begin(k_tiles.of(lo)) : 0;
          j_end = lo < hi ? hi : 0;
        }
        attend_keys(rows, q, k, v, mask, g, qs, ks, vs, scale, band, b, h / group, j_begin, j_end, block_k, drop, st,
                    buf, kT ? &*kT : nullptr);
        write_rows(rows, st, g, b, os, o, lse, row_stats, drop);
      }
    });
    return;
  }

  // Short queries: one tile per (b, kv head) holding all group * Sq rows, or with packed
  // documents one per (kv head, document) holding the group's rows of that document against
  // its keys alone (decoding many sequences at once: each row sees only its own cache). A
  // tile's keys are split in ranges so that there are about kSplitTasks tasks (of at least
  // kMinSplitKeys keys). Like the tiling above, the split follows the shape alone, not the
  // thread count.
  struct ShortTile {
    int64_t b, hk, i0, i1, k0, k1;  // the rows of queries [i0, i1) of kv head (b, hk), against keys [k0, k1)
    int64_t splits, first_task;     // its key splits, and the task of the first
  };
  std::vector<ShortTile> tiles;
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t hk = 0; hk < g.Hkv; ++hk) {
      if (band.cu_q.empty()) {
        tiles.push_back({b, hk, 0, g.Sq, 0, g.Sk, 0, 0});
        continue;
      }
      for (size_t d = 0; d + 1 < band.cu_q.size(); ++d) {
        const int64_t i0 = band.cu_q[d], i1 = band.cu_q[d + 1];
        if (i0 == i1) continue;
        const int64_t k0 = band.lo(i0), k1 = std::max(k0, band.hi(i1 - 1));  // (the bands grow with the row)
        tiles.push_back({b, hk, i0, i1, k0, k1, 0, 0});
      }
    }
  const int64_t want = (kSplitTasks + int64_t(tiles.size()) - 1) / std::max<int64_t>(1, int64_t(tiles.size()));
  int64_t tasks = 0;
  bool any_split = false;
  for (ShortTile& t : tiles) {
    t.splits = std::max<int64_t>(1, std::min(want, (t.k1 - t.k0) / kMinSplitKeys));
    t.first_task = tasks;
    tasks += t.splits;
    any_split |= t.splits > 1;
  }
  auto tile_rows = [&](const ShortTile& t, TileRows& rows) {
    rows.clear();
    for (int64_t h = t.hk * group; h < (t.hk + 1) * group; ++h)
      for (int64_t i = t.i0; i < t.i1; ++i) rows.add(h, i);
  };
  auto tile_of_task = [&](int64_t task) {  // (tiles are in task order)
    return std::upper_bound(tiles.begin(), tiles.end(), task,
                            [](int64_t x, const ShortTile& t) { return x < t.first_task; }) - 1;
  };
  // Partial states of the splits (tiles with splits > 1): per task, m and l (R each) and acc (R x Dv).
  std::vector<TileState<acc_t>> partial(any_split ? tasks : 0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    TileRows rows;
    TileState<acc_t> st;
    TileBuffers<acc_t> buf;
    for (int64_t task = begin; task < end; ++task) {
      const ShortTile& t = *tile_of_task(task);
      const int64_t split = task - t.first_task, n = t.k1 - t.k0;
      tile_rows(t, rows);
      TileState<acc_t>& state = t.splits > 1 ? partial[task] : st;
      state.reset(rows.size(), g.Dv);
      attend_keys(rows, q, k, v, mask, g, qs, ks, vs, scale, band, t.b, t.hk, t.k0 + n * split / t.splits,
                  t.k0 + n * (split + 1) / t.splits, kBlockK, drop, state, buf);
      if (t.splits == 1) write_rows(rows, state, g, t.b, os, o, lse, row_stats, drop);
    }
  });
  if (!any_split) return;
  // Merge the splits of each tile: m = max m_s, l = sum l_s e^(m_s - m), acc likewise.
  at::parallel_for(0, int64_t(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    TileRows rows;
    TileState<acc_t> merged;
    for (int64_t ti = begin; ti < end; ++ti) {
      const ShortTile& t = tiles[ti];
      if (t.splits == 1) continue;  // (written by its task)
      tile_rows(t, rows);
      const int64_t R = rows.size();
      const TileState<acc_t>* parts = partial.data() + t.first_task;
      merged.reset(R, g.Dv);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t sp = 0; sp < t.splits; ++sp) merged.m[r] = max_nan(merged.m[r], parts[sp].m[r]);
        if (merged.m[r] == -std::numeric_limits<acc_t>::infinity()) continue;  // fully masked row
        for (int64_t sp = 0; sp < t.splits; ++sp) {
          const TileState<acc_t>& p = parts[sp];
          const acc_t w = std::exp(p.m[r] - merged.m[r]);  // 0 for a split that saw nothing
          merged.l[r] += p.l[r] * w;
          for (int64_t d = 0; d < g.Dv; ++d) merged.acc[r * g.Dv + d] += p.acc[r * g.Dv + d] * w;
        }
      }
      write_rows(rows, merged, g, t.b, os, o, lse, row_stats, drop);
    }
  });
}

// ---- backward ----
//
// The backward walks a block of query rows against the key tiles those rows see, as
// FlashAttention-2's does, but keeps the rows' p and dp over all of those keys (not one tile
// at a time): p is then the softmax of the recomputed scores from the row's own max, and
// delta = rowsum(p dp), both rounded as an unfused softmax backward rounds them. The
// tile-at-a-time form, p = exp(s - lse) and delta = rowsum(do o), equals them only in exact
// arithmetic, and the long fuzz profile found where the rounding shows:
//  - where one key takes all of a row's weight (p = 1 in float32: a score gap above ~17), an
//    unfused backward's dp - delta is exactly 0, while rowsum(do o) sums that key's dp in
//    another order: ds carried eps |do| |v| of noise where the reference's is 0 (dq 2% off at
//    |v| ~ 1e4);
//  - at |s| ~ 1e29 the recomputed scores differ from the forward's, which lse holds, by ~1e22,
//    and exp(s - lse) was 0 or inf;
//  - lse's rounding leaves sum(p) - 1 ~ 1e-7, and rowsum(ds) = delta (1 - sum p) lands in
//    gradients that are exactly 0 (a key bias's: softmax ignores it).
// lse is used no more, nor are the forward's row stats (csrc/ops.h), which the Triton backward
// takes. The tile products are the same five; the cost is 2 x rows x the keys a block may see
// (Sk, or the longest packed document's) accumulators per thread, held under
// kBackwardRowsBytes by the number of rows per block.
constexpr int64_t kBackwardRowsBytes = int64_t(4) << 20;

// The row stride of the backward's buffers that hold a row's keys (BackwardRows' p and ds, a
// task's K^T and V^T, and the dk^T, dv^T partials): Sk rounded up to kBlockK times a power of
// two. The products on brgemm (tile_product, attention_bwd_packed) take it as a leading dim,
// and brgemm keeps a kernel for each one it meets: a stride that followed Sk itself would add
// kernels for every new length.
int64_t key_stride(int64_t Sk) {
  int64_t ld = kBlockK;
  while (ld < Sk) ld *= 2;
  return ld;
}

// Query rows per backward block: kBlockQ, fewer (a multiple of 16, at least 16) where their p
// and dp over row_keys keys (key_stride(row_keys) of buffer: BackwardPlan::row_keys) would
// pass kBackwardRowsBytes. Follows the shape alone (so do the bits).
template <typename acc_t>
int64_t backward_block_rows(int64_t row_keys) {
  const int64_t row_bytes = 2 * key_stride(row_keys) * int64_t(sizeof(acc_t));
  return std::clamp<int64_t>(kBackwardRowsBytes / row_bytes / 16 * 16, 16, kBlockQ);
}

// The keys [k0, k1) of the key tiles (`tiles`) with keys some query in [i0, i1) sees (k0 = k1
// when there are none): a contiguous run of tiles, since each query's band is contiguous and
// both of its ends move right with the query.
std::pair<int64_t, int64_t> visible_key_range(const KeyBand& band, const Tiles& tiles, int64_t i0, int64_t i1) {
  auto visible = [&](int64_t t) { return band.tile_visible(i0, i1, tiles.begin(t), tiles.end(t)); };
  int64_t first = 0, last = tiles.count();
  while (first < last && !visible(first)) ++first;
  while (last > first && !visible(last - 1)) --last;
  return first == last ? std::pair<int64_t, int64_t>{0, 0}
                       : std::pair<int64_t, int64_t>{tiles.begin(first), tiles.end(last - 1)};
}

// p of query row i in place of its scores over keys [k0, k0 + n) (scaled, masked: -inf outside
// the row's band and where a boolean mask is False): exp(s - max) / sum from the row's own
// max, as an unfused softmax computes it; zeros for a fully masked row, NaN for a NaN row.
template <typename acc_t>
void backward_probs_row(acc_t* row, int64_t i, int64_t k0, int64_t n, const KeyBand& band) {
  using Vec = Vectorized<acc_t>;
  const int64_t lo = std::clamp<int64_t>(band.lo(i) - k0, 0, n);
  const int64_t hi = std::max(lo, std::clamp<int64_t>(band.hi(i) - k0, 0, n));
  const acc_t m = max_row(row, lo, hi);
  if (m == -std::numeric_limits<acc_t>::infinity()) {
    std::fill(row, row + n, acc_t(0));
    return;
  }
  const Vec inv(acc_t(1) / exp_row(row, n, lo, hi, m));
  for_each_chunk<Vec::size()>(hi - lo, [&](int64_t j, int64_t c) {
    (Vec::loadu(row + lo + j, c) * inv).store(row + lo + j, c);
  });
}

// ds = p (dp - delta + dlse) in place of dp, over a query row's n keys, with delta =
// rowsum(p dp) of these same rounded values (see above). lse's gradient enters as
// d lse_i / d s_ij = p_ij, added after the difference so that it survives exactly where
// dp - delta = 0.
template <typename acc_t>
void backward_ds_row(const acc_t* p, acc_t* ds, int64_t n, acc_t dlse) {
  using Vec = Vectorized<acc_t>;
  Vec acc(0);
  for_each_chunk<Vec::size()>(n, [&](int64_t j, int64_t c) {
    acc += Vec::set(Vec(0), Vec::loadu(p + j, c) * Vec::loadu(ds + j, c), c);
  });
  const Vec delta(hsum(acc)), dlse_v(dlse);
  for_each_chunk<Vec::size()>(n, [&](int64_t j, int64_t c) {
    (Vec::loadu(p + j, c) * ((Vec::loadu(ds + j, c) - delta) + dlse_v)).store(ds + j, c);
  });
}

// A block's rows of p and dp (then ds), each over the keys a block may see (column j = key
// base + j, leading dim `ld` = row_keys rounded up by key_stride), of which the block's
// visible tiles are filled; with a softcap, also the cap's derivative at each score (cap, else
// empty). Each item sets base to its first visible key.
template <typename acc_t>
struct BackwardRows {
  int64_t ld = 0, base = 0;
  std::vector<acc_t> p, ds, cap;
  BackwardRows(int64_t rows, int64_t row_keys, bool softcap)
      : ld(key_stride(row_keys)), p(rows * ld), ds(rows * ld), cap(softcap ? rows * ld : 0) {}
  acc_t* p_at(int64_t r, int64_t j) { return p.data() + r * ld + (j - base); }
  acc_t* ds_at(int64_t r, int64_t j) { return ds.data() + r * ld + (j - base); }
  acc_t* cap_at(int64_t r, int64_t j) { return cap.empty() ? nullptr : cap.data() + r * ld + (j - base); }
  // Tile [j0, j0 + nk) of the first nq rows as a tile the mask drops whole leaves them, without
  // its products: scores -inf (so p = 0), dp 0 (so ds = 0), no cap.
  void drop_tile(int64_t nq, int64_t j0, int64_t nk) {
    for (int64_t r = 0; r < nq; ++r) {
      std::fill(p_at(r, j0), p_at(r, j0) + nk, -std::numeric_limits<acc_t>::infinity());
      std::fill(ds_at(r, j0), ds_at(r, j0) + nk, acc_t(0));
      if (acc_t* c = cap_at(r, j0)) std::fill(c, c + nk, acc_t(0));
    }
  }
};

// The per-row steps between a block's tile products, shared by both backward kernels: after
// the scores of keys [k0, k1) are in rows.p, `probs` turns them into p; after dp is in
// rows.ds, `grads` turns it into ds (and writes the mask's gradient).
// The query rows of a backward work item (BackwardPlan): `heads` heads from h0, each with the
// rows i0 .. i0 + nq of the item's query block, head-major (item row r: head r / nq, query
// i0 + r % nq). Its rows are contiguous in q, do and dq where it has one head; a group's heads
// are Sq rows apart.
struct ItemRows {
  int64_t b, h0, i0, nq, heads, Hq, Sq;
  int64_t count() const { return nq * heads; }
  int64_t head(int64_t r) const { return h0 + r / nq; }
  int64_t query(int64_t r) const { return i0 + r % nq; }
  int64_t global(int64_t r) const { return (b * Hq + head(r)) * Sq + query(r); }  // the row over (B, Hq, Sq)
};

// The item's rows of x (B, Hq, Sq, width), contiguous (rows x width) acc_t times `scale`.
template <typename scalar_t>
const at::opmath_type<scalar_t>* widened_item_rows(const scalar_t* x, const ItemRows& ir, int64_t width,
                                                   at::opmath_type<scalar_t> scale,
                                                   std::vector<at::opmath_type<scalar_t>>& buf) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  buf.resize(ir.count() * width);
  for (int64_t r = 0; r < ir.count(); ++r) {
    const scalar_t* src = x + ir.global(r) * width;
    for_each_chunk<Chunk<scalar_t>::kChunk>(width, [&](int64_t d, int64_t n) {
      auto c = Chunk<scalar_t>::load(src + d, n);
      c.lo = c.lo * Vec(scale);
      c.hi = c.hi * Vec(scale);
      c.store_acc(buf.data() + r * width + d, n);
    });
  }
  return buf.data();
}

// The item's rows of x (B, Hq, Sq, width), contiguous (rows x width), copied into buf.
template <typename scalar_t>
const scalar_t* gathered_rows(const scalar_t* x, const ItemRows& ir, int64_t width, std::vector<scalar_t>& buf) {
  buf.resize(ir.count() * width);
  for (int64_t r = 0; r < ir.count(); ++r) std::copy_n(x + ir.global(r) * width, width, buf.data() + r * width);
  return buf.data();
}

template <typename acc_t, typename mask_t>
struct BackwardRowSteps {
  const Geometry& g;
  const KeyBand& band;
  const MaskView<mask_t>& mask;
  const acc_t* dlse;   // or nullptr
  acc_t* dmask;        // (B, Hq, Sq, Sk) or nullptr: ds unrounded (see attention_bwd)
  const Dropout& drop;

  // Scales (by pre_scale, where the tile lacks the scale), caps and masks scores tile
  // [j0, j0 + nk) of the item's rows.
  void mask_tile(BackwardRows<acc_t>& rows, const ItemRows& ir, int64_t j0, int64_t nk,
                 acc_t pre_scale = acc_t(1)) const {
    for (int64_t r = 0; r < ir.count(); ++r)
      prepare_row(rows.p_at(r, j0), ir.query(r), j0, nk, band, mask.row(ir.b, ir.head(r), ir.query(r)), mask.sk,
                  rows.cap_at(r, j0), pre_scale);
  }
  // dropped[t - first]: whether the mask drops key tile t (of `tiles`, from first = the one at
  // k0, up to k1) for the item's rows whole (mask_drops_tile). Such tiles skip their products;
  // their entries of rows are set here as masking would have left them (drop_tile).
  void drop_masked_tiles(BackwardRows<acc_t>& rows, const Tiles& tiles, const ItemRows& ir, int64_t k0, int64_t k1,
                         std::vector<char>& dropped) const {
    auto row_of = [&](int64_t r) { return std::pair<int64_t, int64_t>{ir.head(r), ir.query(r)}; };
    dropped.clear();
    for (int64_t t = k0 < k1 ? tiles.of(k0) : tiles.count(); t < tiles.count() && tiles.begin(t) < k1; ++t) {
      dropped.push_back(mask_drops_tile(mask, band, ir.b, ir.count(), row_of, tiles.begin(t), tiles.size(t)));
      if (dropped.back()) rows.drop_tile(ir.count(), tiles.begin(t), tiles.size(t));
    }
  }
  void probs(BackwardRows<acc_t>& rows, const ItemRows& ir, int64_t k0, int64_t k1) const {
    for (int64_t r = 0; r < ir.count(); ++r) backward_probs_row(rows.p_at(r, k0), ir.query(r), k0, k1 - k0, band);
  }
  // The p tile [j0, j0 + nk) of the item's rows as dv's product takes it: p itself, or with
  // dropout p * keep / (1 - dropout_p) in `buf`. Returns (tile, leading dim).
  std::pair<const acc_t*, int64_t> dv_probs(BackwardRows<acc_t>& rows, const ItemRows& ir, int64_t j0, int64_t nk,
                                            std::vector<acc_t>& buf) const {
    if (!drop.on) return {rows.p_at(0, j0), rows.ld};
    buf.resize(ir.count() * nk);
    for (int64_t r = 0; r < ir.count(); ++r)
      drop.apply(buf.data() + r * nk, rows.p_at(r, j0), nk, drop.row_key(ir.global(r)), j0, acc_t(drop.keep_scale));
    return {buf.data(), nk};
  }
  void grads(BackwardRows<acc_t>& rows, const ItemRows& ir, int64_t k0, int64_t k1) const {
    for (int64_t r = 0; r < ir.count(); ++r) {
      const int64_t row = ir.global(r);
      acc_t* ds = rows.ds_at(r, k0);
      if (drop.on)  // dp of the dropped p: dp * keep / (1 - dropout_p)
        drop.apply(ds, ds, k1 - k0, drop.row_key(row), k0, acc_t(drop.keep_scale));
      backward_ds_row(rows.p_at(r, k0), ds, k1 - k0, dlse != nullptr ? dlse[row] : acc_t(0));
      if (dmask != nullptr) {  // d(loss)/d(additive mask) = ds (0, as allocated, outside [k0, k1))
        std::copy(ds, ds + (k1 - k0), dmask + row * g.Sk + k0);
      }
      if (const acc_t* cap = rows.cap_at(r, k0)) {  // the scores before the cap: ds (1 - tanh^2)
        using Vec = Vectorized<acc_t>;
        for_each_chunk<Vec::size()>(k1 - k0, [&](int64_t j, int64_t n) {
          (Vec::loadu(ds + j, n) * Vec::loadu(cap + j, n)).store(ds + j, n);
        });
      }
    }
  }
};

// How the backward splits its work over tasks. Each (b, kv head) owns dk, dv of its keys and
// the dq of the query heads reading it; its work items are (query block, head of the group)
// pairs, listed query block first, except that a block of few rows (decoding: a row or two a
// sequence or document) may take several of the group's heads in one item, up to
// `stacked_rows` rows: one set of products over its keys for them all, instead of a set a head.
// The bfloat16 backward stacks up to kPaddedRows, to which its brgemm products pad every block
// anyway (a decoding step's backward 1.2-2x faster). The float one does not: MKL's sgemm on 2-3
// rows was no faster than as many one-row calls at 300 keys (155 against 160-190 us), and from
// 4 rows on it takes FMA-chain kernels for q k^T with 1.7x the rounding error of the
// dot-product ones below (this Zen 4, K = 64 and 192): 6 stacked rows put dv and dk past the
// budget. Where the (b, kv head)s alone are fewer than
// kBackwardTasks (a batch of 1, grouped-query or multi-query attention), each one's items are
// cut into `chunks` runs of about equal cost (rows x visible keys; kChunkRows rows or more on
// average), one task each: a chunk writes the dq of its rows and sums its rows' dk, dv into a
// partial of its own over the keys its rows see, and the partials are added up afterwards,
// chunk by chunk in order. Listing
// query blocks first keeps a chunk's rows at neighbouring positions, so under a causal or
// window band its partial covers only the keys they see. Like the forward's split, the plan
// follows the shape alone, so the bits do not change with torch.set_num_threads.
constexpr int64_t kBackwardTasks = 32;
// The fewest query rows (of all of a (b, kv head)'s heads), on average, per chunk (see backward_plan).
constexpr int64_t kChunkRows = 16;
// The partials' memory, at most, counting each chunk's as all keys' (where one chunk's passes
// it: no split). 32 MiB: one head of 8k keys at D = 64 splits in 8 chunks. (A chunk's row
// stride, key_stride of its keys, can be up to twice its keys: at worst twice this, just past
// a power of two times 256 keys. Counting the stride instead would halve the chunks there.)
constexpr int64_t kBackwardPartialBytes = int64_t(32) << 20;

// A backward work item: query block qb of `heads` heads of the group, from h_lo.
struct BackwardItem {
  int64_t qb, h_lo, heads;
};

struct BackwardPlan {
  int64_t block_q = 0, q_blocks = 0, group = 0;  // block_q: the most rows of a query block
  // The most keys a query block sees: Sk, or with packed documents the longest document's
  // keys (a block holds one document's rows). BackwardRows and a block's rows follow it, not
  // Sk: 32 documents of 1024 tokens in one row took 16-row blocks (1.19-1.24x the time of the
  // same documents as a batch) where 128 fit.
  int64_t row_keys = 0;
  int64_t max_item_rows = 0;                     // the most rows of an item (block rows x heads)
  Tiles q_tiles, k_tiles;                        // the query blocks, and the key tiles (kBlockK)
  std::vector<BackwardItem> work;                // the items, query block first
  int64_t chunks = 1;
  std::vector<int64_t> first_item;                      // chunk c: items [first_item[c], first_item[c + 1])
  std::vector<std::pair<int64_t, int64_t>> keys;        // chunk c: its rows' keys [k0, k1) (k0 = k1: none)
  std::vector<int64_t> partial_key;                     // chunk c: its partial's first column, per (b, kv head)
  int64_t partial_keys = 0;                             // all chunks' partials of one (b, kv head), in columns
  // Whether no two chunks' keys overlap (one chunk; packed documents cut between them): then
  // each chunk's partial is its keys' dk, dv, written by its own task, which also writes
  // zeros for the keys that no chunk's rows see in written[c] (the keys from the previous
  // chunk's last to its own, and, for the last chunk, to Sk). Else the partials are added up.
  bool disjoint = true;
  std::vector<std::pair<int64_t, int64_t>> written;     // chunk c, where disjoint: the keys its task writes

  int64_t items() const { return int64_t(work.size()); }
  int64_t keys_of(int64_t c) const { return keys[c].second - keys[c].first; }
  // Chunk c's partial's columns (its row stride): its keys rounded up by key_stride, 0 with none.
  int64_t partial_ld(int64_t c) const { return keys_of(c) > 0 ? key_stride(keys_of(c)) : 0; }
  const BackwardItem& item(int64_t it) const { return work[it]; }
  int64_t rows_of(const BackwardItem& it) const { return q_tiles.size(it.qb) * it.heads; }
  // Whether some item of chunk c has kSmallRows rows or more: only products of such items
  // read K^T and V^T (product_with_rows multiplies fewer rows by K's and V's rows as stored),
  // so a chunk of decoding rows need not transpose its keys.
  bool has_wide_block(int64_t c) const {
    for (int64_t it = first_item[c]; it < first_item[c + 1]; ++it)
      if (rows_of(item(it)) >= kSmallRows) return true;
    return false;
  }
  // The key tiles [first, end) of [k0, k1) (a tile start and a tile end, or k0 = k1: none).
  std::pair<int64_t, int64_t> key_tiles_of(int64_t k0, int64_t k1) const {
    if (k0 >= k1) return {0, 0};
    return {k_tiles.of(k0), k_tiles.of(k1 - 1) + 1};
  }
};

template <typename acc_t>
BackwardPlan backward_plan(const Geometry& g, const KeyBand& band, int64_t stacked_rows) {
  BackwardPlan plan;
  plan.row_keys = g.Sk;
  if (!band.cu_k.empty()) {
    plan.row_keys = 0;
    for (size_t d = 0; d + 1 < band.cu_k.size(); ++d)
      plan.row_keys = std::max(plan.row_keys, band.cu_k[d + 1] - band.cu_k[d]);
  }
  plan.block_q = backward_block_rows<acc_t>(plan.row_keys);
  plan.q_tiles = band.query_tiles(g.Sq, plan.block_q);  // (cut at documents' starts, where there are some)
  // The buffers follow the largest block there is: one row a document when decoding many
  // sequences, where buffers for full blocks were zeroed pages, fresh each call, per thread.
  int64_t largest = 1;
  for (int64_t t = 0; t < plan.q_tiles.count(); ++t) largest = std::max(largest, plan.q_tiles.size(t));
  plan.block_q = std::min(plan.block_q, largest);
  plan.k_tiles = band.key_tiles(kBlockK);
  plan.q_blocks = plan.q_tiles.count();
  plan.group = g.group();
  for (int64_t qb = 0; qb < plan.q_blocks; ++qb) {
    const int64_t heads = std::max<int64_t>(1, stacked_rows / plan.q_tiles.size(qb));  // heads an item holds
    for (int64_t h = 0; h < plan.group; h += heads) plan.work.push_back({qb, h, std::min(heads, plan.group - h)});
  }
  plan.max_item_rows = plan.block_q;
  for (const BackwardItem& it : plan.work) plan.max_item_rows = std::max(plan.max_item_rows, plan.rows_of(it));
  const int64_t heads = g.B * g.Hkv, items = plan.items();
  // dk + dv, all keys
  const int64_t chunk_bytes = std::max<int64_t>(1, g.Sk * (g.D + g.Dv)) * int64_t(sizeof(acc_t));
  const int64_t by_memory = kBackwardPartialBytes / (std::max<int64_t>(heads, 1) * chunk_bytes);
  // A chunk has a partial to zero and add up, two passes over its keys x (D + Dv): worth it
  // only for rows enough that their products dwarf that. Decoding's few rows per kv head (a
  // group of single rows) take one chunk: split, the partials cost more than the rows' work
  // (benchmarks/results/cpu-epyc-zen4-2026-12-07-attention-decode-backward.txt).
  const int64_t by_rows = std::max<int64_t>(1, g.Sq * plan.group / kChunkRows);
  plan.chunks = std::max<int64_t>(
      1, std::min({(kBackwardTasks + heads - 1) / std::max<int64_t>(heads, 1), items, by_memory, by_rows}));

  // The visible keys of each query block, and the items' costs: rows x (visible keys + D), the
  // D standing for a block's work besides its products (loads, dq's store).
  std::vector<std::pair<int64_t, int64_t>> block_keys(plan.q_blocks);
  std::vector<int64_t> cost_before(items + 1, 0);  // prefix sums
  for (int64_t it = 0; it < items; ++it) {
    const BackwardItem& item = plan.item(it);
    const int64_t qb = item.qb, i0 = plan.q_tiles.begin(qb), nq = plan.q_tiles.size(qb);
    if (item.h_lo == 0) block_keys[qb] = visible_key_range(band, plan.k_tiles, i0, i0 + nq);
    cost_before[it + 1] = cost_before[it] + nq * item.heads * (block_keys[qb].second - block_keys[qb].first + g.D);
  }
  // Chunk c ends at the first item whose prefix cost reaches c + 1 chunks' share. With packed
  // documents and 4 query blocks or more a chunk, at the query block's start nearest to it:
  // then chunks do not share a block's keys, and where they share no document (decoding many
  // sequences) they are disjoint (no partials to add up; see `disjoint`).
  const bool at_blocks = !band.cu_q.empty() && plan.q_blocks >= 4 * plan.chunks;
  auto block_start = [&](int64_t it) { return it == items || plan.item(it).h_lo == 0; };
  plan.first_item.assign(plan.chunks + 1, 0);
  for (int64_t c = 1; c <= plan.chunks; ++c) {
    const int64_t share = c == plan.chunks ? cost_before[items] : cost_before[items] * c / plan.chunks;
    const int64_t prev = plan.first_item[c - 1];
    int64_t it = prev;
    while (it < items && cost_before[it] < share) ++it;
    if (at_blocks && !block_start(it)) {
      int64_t down = it, up = it;
      while (down > prev && !block_start(down)) --down;
      while (!block_start(up)) ++up;
      it = share - cost_before[down] <= cost_before[up] - share ? down : up;
    }
    plan.first_item[c] = c == plan.chunks ? items : it;
  }
  for (int64_t c = 0; c < plan.chunks; ++c) {
    int64_t k0 = g.Sk, k1 = 0;
    for (int64_t it = plan.first_item[c]; it < plan.first_item[c + 1]; ++it) {
      const auto [b0, b1] = block_keys[plan.item(it).qb];
      if (b0 < b1) k0 = std::min(k0, b0), k1 = std::max(k1, b1);
    }
    plan.keys.push_back(k0 < k1 ? std::pair<int64_t, int64_t>{k0, k1} : std::pair<int64_t, int64_t>{0, 0});
    plan.partial_key.push_back(plan.partial_keys);
    plan.partial_keys += plan.partial_ld(c);
  }
  int64_t seen = 0;  // the last key of the chunks so far
  for (int64_t c = 0; c < plan.chunks; ++c) {
    if (plan.keys_of(c) == 0) continue;
    if (plan.keys[c].first < seen) plan.disjoint = false;
    seen = plan.keys[c].second;
  }
  for (int64_t c = 0, lo = 0; plan.disjoint && c < plan.chunks; ++c) {
    const int64_t hi = c + 1 == plan.chunks ? g.Sk : plan.keys_of(c) > 0 ? plan.keys[c].second : lo;
    plan.written.push_back({lo, hi});
    lo = hi;
  }
  return plan;
}

// The dk, dv partials of a plan's chunks, and their sum into dk, dv. Chunk c of a (b, kv head)
// sums into (dk part, dv part) over its keys, in one of two layouts: transposed, (D, keys) and
// (Dv, keys) row-major with row stride plan.partial_ld(c), as products over blocks of many rows
// accumulate them (dk^T += q^T ds, dv^T += do^T p, on brgemm); or as rows, (keys, D) and
// (keys, Dv), as the float backward accumulates them where every item has few rows (dk += ds^T
// q: decoding), which dk, dv take with no transpose. Where the plan's chunks are disjoint, a
// task keeps its chunk's partial in its own buffer and writes its keys of dk, dv at once (float
// rows: the partial is dk, dv themselves, no buffer); else the partials live here until
// write_all(), after every chunk is done, adds them up.
template <typename acc_t, typename scalar_t>
class KeyGradPartials {
 public:
  // dk is written times dk_scale.
  KeyGradPartials(const BackwardPlan& plan, const Geometry& g, bool rows, acc_t dk_scale, scalar_t* dk, scalar_t* dv)
      : plan_(plan), g_(g), rows_(rows), dk_scale_(dk_scale), dk_(dk), dv_(dv),
        head_elems_(plan.partial_keys * (g.D + g.Dv)),
        shared_(plan.disjoint ? nullptr : new acc_t[g.B * g.Hkv * head_elems_]) {}

  // The (dk, dv) partials of chunk c of (b, kv head) bh, zeroed over the chunk's keys (by the
  // task, so each thread first touches the pages it uses; the keys past them, up to
  // partial_ld(c), are never read). `own` holds them where the chunks are disjoint.
  std::pair<acc_t*, acc_t*> chunk(int64_t bh, int64_t c, std::vector<acc_t>& own) const {
    const int64_t n = plan_.keys_of(c), ld = plan_.partial_ld(c), D = g_.D, Dv = g_.Dv;
    acc_t *dk_part = nullptr, *dv_part = nullptr;
    if (shared_) {
      std::tie(dk_part, dv_part) = parts_of(shared_.get() + bh * head_elems_, c);
    } else if constexpr (std::is_same_v<acc_t, scalar_t>) {
      if (in_place()) {
        const int64_t kv0 = bh * g_.Sk + plan_.keys[c].first;  // key row k0, over (B, Hkv, Sk)
        dk_part = dk_ + kv0 * D, dv_part = dv_ + kv0 * Dv;
      }
    }
    if (dk_part == nullptr) {
      own.resize(ld * (D + Dv));
      dk_part = own.data(), dv_part = own.data() + ld * D;
    }
    if (rows_) {
      std::fill_n(dk_part, n * D, acc_t(0));
      std::fill_n(dv_part, n * Dv, acc_t(0));
    } else {
      for (int64_t d = 0; d < D; ++d) std::fill_n(dk_part + d * ld, n, acc_t(0));
      for (int64_t d = 0; d < Dv; ++d) std::fill_n(dv_part + d * ld, n, acc_t(0));
    }
    return {dk_part, dv_part};
  }

  // After the task of chunk c of bh, where the chunks are disjoint: writes the keys the plan
  // gives it (plan.written[c]), from its partial in `own` (see chunk()) and zeros.
  void task_done(int64_t bh, int64_t c, const std::vector<acc_t>& own) const {
    if (shared_) return;
    const auto [lo, hi] = plan_.written[c];
    const int64_t n = plan_.keys_of(c), k0 = n > 0 ? plan_.keys[c].first : hi, k1 = n > 0 ? plan_.keys[c].second : hi;
    zero_keys(bh, lo, k0);
    zero_keys(bh, k1, hi);
    if (in_place() || n == 0) return;
    const acc_t* dk_part = own.data();
    const acc_t* dv_part = own.data() + plan_.partial_ld(c) * g_.D;
    std::vector<acc_t> buf;
    for (int64_t j0 = k0; j0 < k1; j0 += kBlockK) {
      const int64_t nk = std::min(k1, j0 + kBlockK) - j0;
      buf.resize(nk * (g_.D + g_.Dv));
      store_keys(bh, j0, nk, as_rows(dk_part, g_.D, plan_.partial_ld(c), j0 - k0, nk, buf.data()),
                 as_rows(dv_part, g_.Dv, plan_.partial_ld(c), j0 - k0, nk, buf.data() + nk * g_.D));
    }
  }

  // After every task, where the chunks are not disjoint: writes every dk, dv, each key's
  // partials added up in chunk order (0 for keys no chunk's rows see).
  void write_all() const {
    if (!shared_) return;
    const int64_t tiles = (g_.Sk + kBlockK - 1) / kBlockK;
    at::parallel_for(0, g_.B * g_.Hkv * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / tiles, j0 = t % tiles * kBlockK;
        write_sum(bh, j0, std::min(g_.Sk, j0 + kBlockK), buf);
      }
    });
  }

 private:
  // Whether a disjoint chunk's partial is dk, dv itself (rows of acc_t, unscaled).
  bool in_place() const { return std::is_same_v<acc_t, scalar_t> && rows_ && !shared_ && dk_scale_ == acc_t(1); }

  // Chunk c's (dk part, dv part) in one (b, kv head)'s partials: all dk's, then all dv's.
  std::pair<acc_t*, acc_t*> parts_of(acc_t* parts, int64_t c) const {
    return {parts + plan_.partial_key[c] * g_.D, parts + plan_.partial_keys * g_.D + plan_.partial_key[c] * g_.Dv};
  }

  // Keys [at, at + n) of a partial `width` wide (row stride ld where transposed) as rows (n x
  // width): the partial itself where it is rows, else transposed into `out`.
  const acc_t* as_rows(const acc_t* part, int64_t width, int64_t ld, int64_t at, int64_t n, acc_t* out) const {
    if (rows_) return part + at * width;
    transpose_tile(part + at, width, n, ld, out);
    return out;
  }

  // dk, dv rows of keys [j0, j0 + n) of bh from (n, D) and (n, Dv) rows: dk times dk_scale.
  void store_keys(int64_t bh, int64_t j0, int64_t n, const acc_t* dk_rows, const acc_t* dv_rows) const {
    using C = Chunk<scalar_t>;
    const int64_t D = g_.D, Dv = g_.Dv, kv0 = bh * g_.Sk + j0;  // key row j0, over (B, Hkv, Sk)
    const typename C::Vec scale_v(dk_scale_);
    for (int64_t j = 0; j < n; ++j) {
      for_each_chunk<C::kChunk>(D, [&](int64_t d, int64_t m) {
        auto c = C::load_acc(dk_rows + j * D + d, m);
        c.lo *= scale_v;
        c.hi *= scale_v;
        c.store(dk_ + (kv0 + j) * D + d, m);
      });
      for_each_chunk<C::kChunk>(Dv, [&](int64_t d, int64_t m) {
        C::load_acc(dv_rows + j * Dv + d, m).store(dv_ + (kv0 + j) * Dv + d, m);
      });
    }
  }
  // dk, dv of keys [j0, j1) of bh: zeros (keys no query sees).
  void zero_keys(int64_t bh, int64_t j0, int64_t j1) const {
    if (j0 >= j1) return;
    std::fill(dk_ + (bh * g_.Sk + j0) * g_.D, dk_ + (bh * g_.Sk + j1) * g_.D, scalar_t(0));
    std::fill(dv_ + (bh * g_.Sk + j0) * g_.Dv, dv_ + (bh * g_.Sk + j1) * g_.Dv, scalar_t(0));
  }

  // dk, dv of keys [j0, j1) of bh: every chunk's partial added up in chunk order, in `buf`
  // (laid out as the partials are, n keys; 0 for keys no query sees), then stored.
  void write_sum(int64_t bh, int64_t j0, int64_t j1, std::vector<acc_t>& buf) const {
    const int64_t D = g_.D, Dv = g_.Dv, n = j1 - j0;
    buf.resize(2 * n * (D + Dv));
    acc_t* const dk_sum = buf.data();
    acc_t* const dv_sum = dk_sum + n * D;
    std::fill_n(buf.data(), n * (D + Dv), acc_t(0));
    // adds keys [lo, hi) of a partial (keys from k0, row stride ld where transposed) into sum
    auto add_keys = [&](acc_t* sum, const acc_t* part, int64_t width, int64_t k0, int64_t ld, int64_t lo, int64_t hi) {
      if (rows_) {
        for (int64_t i = 0; i < (hi - lo) * width; ++i) sum[(lo - j0) * width + i] += part[(lo - k0) * width + i];
      } else {
        for (int64_t d = 0; d < width; ++d)
          for (int64_t j = lo; j < hi; ++j) sum[d * n + (j - j0)] += part[d * ld + (j - k0)];
      }
    };
    acc_t* const parts = shared_.get() + bh * head_elems_;
    for (int64_t c = 0; c < plan_.chunks; ++c) {
      const auto [k0, k1] = plan_.keys[c];
      const int64_t lo = std::max(j0, k0), hi = std::min(j1, k1);
      if (lo >= hi) continue;
      const auto [dk_part, dv_part] = parts_of(parts, c);
      add_keys(dk_sum, dk_part, D, k0, plan_.partial_ld(c), lo, hi);
      add_keys(dv_sum, dv_part, Dv, k0, plan_.partial_ld(c), lo, hi);
    }
    acc_t* const rows_out = buf.data() + n * (D + Dv);  // (n, D) and (n, Dv): the sums as rows
    store_keys(bh, j0, n, as_rows(dk_sum, D, n, 0, n, rows_out), as_rows(dv_sum, Dv, n, 0, n, rows_out + n * D));
  }

  const BackwardPlan& plan_;
  const Geometry& g_;
  const bool rows_;
  const acc_t dk_scale_;
  scalar_t* const dk_;
  scalar_t* const dv_;
  const int64_t head_elems_;         // one (b, kv head)'s partials: partial_keys x (D + Dv)
  std::unique_ptr<acc_t[]> shared_;  // (B * Hkv, head_elems_): dk's, then dv's; or none (disjoint)
};

template <typename mask_t>
void attention_bwd_packed(const at::BFloat16* dout, const at::BFloat16* q, const at::BFloat16* k,
                          const at::BFloat16* v, const float* dlse, const MaskView<mask_t>& mask,
                          const Geometry& g, float scale, const KeyBand& band, const Dropout& drop,
                          at::BFloat16* dq, at::BFloat16* dk, at::BFloat16* dv, float* dmask);

// The backward (o and row_stats, which the forward returned, are not needed: see above).
template <typename scalar_t, typename mask_t>
void attention_bwd_kernel(const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                          const at::opmath_type<scalar_t>* dlse /* or nullptr */,
                          const MaskView<mask_t>& mask, const Geometry& g, double scale_d,
                          const KeyBand& band, const Dropout& drop, scalar_t* dq, scalar_t* dk, scalar_t* dv,
                          at::opmath_type<scalar_t>* dmask /* (B, Hq, Sq, Sk) or nullptr */) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t D = g.D, Dv = g.Dv;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (use_bf16_brgemm(g)) {
      return attention_bwd_packed(dout, q, k, v, dlse, mask, g, scale, band, drop, dq, dk, dv, dmask);
    }
  }
  const BackwardPlan plan = backward_plan<acc_t>(g, band, /*stacked_rows=*/1);  // (one head an item: see BackwardPlan)
  // Where every item has few rows (decoding), dk and dv accumulate as rows: no transposes of
  // q, do or the partials, and with disjoint chunks straight into dk, dv (KeyGradPartials).
  const bool few_rows = plan.max_item_rows < kSmallRows;
  const KeyGradPartials<acc_t, scalar_t> partials(plan, g, /*rows=*/few_rows, acc_t(1), dk, dv);
  const BackwardRowSteps<acc_t, mask_t> steps{g, band, mask, dlse, dmask, drop};

  // One task per chunk of a (b, kv head) (see BackwardPlan): it writes the dq of its rows and
  // sums their dk, dv over the keys they see, [ck0, ck1). The five tile products take their
  // operands untransposed (tile_product): dk and dv are accumulated transposed, dk^T += q^T ds
  // and dv^T += do^T p, from q^T and do^T made once per query block (or, few_rows, as rows:
  // dk += ds^T q, dv += p^T do, on sgemm), and s = q k^T and dp = do v^T read K^T and V^T made
  // once per task. A full block (full_rows queries) against
  // a full tile (kBlockK keys) multiplies on brgemm, with leading dims from a small set: the
  // rows of p and ds, K^T and V^T have the row stride ld_keys, the partials of dk^T and dv^T
  // ld_part (both key_stride).
  const int64_t full_rows = backward_block_rows<acc_t>(plan.row_keys), ld_keys = key_stride(g.Sk);
  at::parallel_for(0, g.B * g.Hkv * plan.chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t most_rows = plan.max_item_rows;
    BackwardRows<acc_t> rows(most_rows, plan.row_keys, band.softcap > 0);
    std::vector<acc_t> dq_buf(most_rows * D), own_parts, q_buf, do_buf, k_buf, v_buf, pd_buf;  // (do, v: Dv wide)
    // K^T and V^T, key ck0 first (sized where a chunk first needs them); q^T and do^T of an item
    std::vector<acc_t> kT, vT, qT(D * most_rows), doT(Dv * most_rows);
    std::vector<char> dropped;  // per key tile of a query block: whether the mask drops it whole
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % plan.chunks, bh = task / plan.chunks, b = bh / g.Hkv, hk = bh % g.Hkv;
      const auto [ck0, ck1] = plan.keys[c];
      const int64_t n_keys = ck1 - ck0;
      const int64_t kv0 = bh * g.Sk + ck0;                                  // key row ck0, over (B, Hkv, Sk)
      const acc_t* kw = load_tile(k + kv0 * D, n_keys, D, D, k_buf).first;  // widened once per task
      const acc_t* vw = load_tile(v + kv0 * Dv, n_keys, Dv, Dv, v_buf).first;
      const bool keys_transposed = plan.has_wide_block(c);
      if (keys_transposed) {
        kT.resize(D * ld_keys), vT.resize(Dv * ld_keys);
        transpose_tile(kw, n_keys, D, D, kT.data(), ld_keys);
        transpose_tile(vw, n_keys, Dv, Dv, vT.data(), ld_keys);
      }
      // dk^T, dv^T of the chunk's keys: (D, n_keys), (Dv, n_keys), key ck0 first, row stride
      // ld_part; few_rows: dk, dv, (n_keys, D), (n_keys, Dv)
      const auto [dk_part, dv_part] = partials.chunk(bh, c, own_parts);
      const int64_t ld_part = plan.partial_ld(c);
      for (int64_t item = plan.first_item[c]; item < plan.first_item[c + 1]; ++item) {
        const BackwardItem& work = plan.item(item);
        const int64_t i0 = plan.q_tiles.begin(work.qb), rows_in_block = plan.q_tiles.size(work.qb);
        const ItemRows ir{b, hk * g.group() + work.h_lo, i0, rows_in_block, work.heads, g.Hq, g.Sq};
        const int64_t nq = ir.count(), row0 = ir.global(0);  // the item's rows; with one head, from row0 on
        // scale * q and do, (nq, D) and (nq, Dv): a group's heads gathered (their rows lie Sq apart)
        const acc_t* qt = widened_item_rows(q, ir, D, scale, q_buf);
        const acc_t* dot = ir.heads == 1 ? load_tile(dout + row0 * Dv, nq, Dv, Dv, do_buf).first
                                         : widened_item_rows(dout, ir, Dv, acc_t(1), do_buf);
        if (!few_rows) {
          transpose_tile(qt, nq, D, D, qT.data());
          transpose_tile(dot, nq, Dv, Dv, doT.data());
        }
        std::fill(dq_buf.begin(), dq_buf.begin() + nq * D, acc_t(0));
        // the keys these rows see (the group's heads share their rows' positions)
        const auto [k0, k1] = visible_key_range(band, plan.k_tiles, i0, i0 + rows_in_block);
        rows.base = k0;
        steps.drop_masked_tiles(rows, plan.k_tiles, ir, k0, k1, dropped);
        const auto [t0, t1] = plan.key_tiles_of(k0, k1);
        // f(j0, nk, key j0's offset from ck0, whether the tile is full), tiles not dropped
        auto each_tile = [&](auto&& f) {
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t j0 = plan.k_tiles.begin(t), nk = plan.k_tiles.size(t);
            if (!dropped[t - t0]) f(j0, nk, j0 - ck0, nq == full_rows && nk == kBlockK);
          }
        };
        // K^T, V^T from key ck0 + at (null where this chunk made none: its blocks' products read K, V)
        auto kT_at = [&](int64_t at) { return keys_transposed ? kT.data() + at : nullptr; };
        auto vT_at = [&](int64_t at) { return keys_transposed ? vT.data() + at : nullptr; };
        each_tile([&](int64_t j0, int64_t nk, int64_t at, bool full) {  // s = (scale q) k^T, masked
          product_with_rows(nq, nk, D, qt, D, kw + at * D, D, kT_at(at), ld_keys, rows.p_at(0, j0), rows.ld, full);
          steps.mask_tile(rows, ir, j0, nk);
        });
        steps.probs(rows, ir, k0, k1);
        each_tile([&](int64_t j0, int64_t nk, int64_t at, bool full) {
          const auto [pt, ldp] = steps.dv_probs(rows, ir, j0, nk, pd_buf);
          if (few_rows) {  // dv += p^T do
            gemm<acc_t>(false, nk, Dv, nq, acc_t(1), pt, ldp, dot, Dv, acc_t(1), dv_part + at * Dv, Dv, /*a_t=*/true);
          } else {  // dv^T += do^T p
            tile_product(Dv, nk, nq, doT.data(), nq, pt, ldp, dv_part + at, ld_part, true, full);
          }
          product_with_rows(nq, nk, Dv, dot, Dv, vw + at * Dv, Dv, vT_at(at), ld_keys, rows.ds_at(0, j0),
                            rows.ld, full);  // dp = do v^T
        });
        steps.grads(rows, ir, k0, k1);  // ds = p (dp - delta + dlse)
        each_tile([&](int64_t j0, int64_t nk, int64_t at, bool full) {
          tile_product(nq, D, nk, rows.ds_at(0, j0), rows.ld, kw + at * D, D, dq_buf.data(), D, true, full);  // dq += ds k
          if (few_rows) {  // dk += ds^T (scale q)
            gemm<acc_t>(false, nk, D, nq, acc_t(1), rows.ds_at(0, j0), rows.ld, qt, D, acc_t(1), dk_part + at * D, D,
                        /*a_t=*/true);
          } else {  // dk^T += (scale q)^T ds
            tile_product(D, nk, nq, qT.data(), nq, rows.ds_at(0, j0), rows.ld, dk_part + at, ld_part, true, full);
          }
        });
        for (int64_t r = 0; r < nq; ++r) {  // dq = scale ds k
          scalar_t* dq_row = dq + ir.global(r) * D;
          for (int64_t d = 0; d < D; ++d) dq_row[d] = scalar_t(dq_buf[r * D + d] * scale);
        }
      }
      partials.task_done(bh, c, own_parts);
    }
  });
  partials.write_all();
}

// K^T, K and V^T of kv heads, packed per key tile for the bfloat16 backward's products
// s = q K^T, dq += ds K and dp = do V^T (layouts: pack_transposed, pack_rows), each tile's keys
// padded with zeros to a multiple of kPaddedKeys. Slot s holds one (b, kv head).
struct BackwardPackedKV {
  static constexpr int64_t kTileKeys = round_up(kBlockK, kPaddedKeys);  // (even: the VNNI pairs)
  int64_t D = 0, Dv = 0, slot_keys = 0;  // tile t of a slot starts at key slot * slot_keys + tile_key[t]
  std::vector<int64_t> tile_key;         // padded_tile_starts
  std::vector<at::BFloat16> kT, kp, vT;

  BackwardPackedKV(int64_t slots, const Geometry& g, const Tiles& keys)
      : D(g.D), Dv(g.Dv), tile_key(padded_tile_starts(keys)) {
    slot_keys = tile_key.back();
    kT.resize(slots * slot_keys * D), kp.resize(kT.size()), vT.resize(slots * slot_keys * Dv);
  }
  // Packs key tile t (of `keys`, the plan's key tiles) of (b, kv head) bh into `slot`. The
  // padding keys stay zeros as allocated: a slot's tile t always holds tile t's keys.
  void pack(const at::BFloat16* k, const at::BFloat16* v, const Geometry& g, const Tiles& keys, int64_t bh, int64_t t,
            int64_t slot) {
    const int64_t j0 = keys.begin(t), nk = keys.size(t), row = bh * g.Sk + j0, at = slot * slot_keys + tile_key[t];
    const int64_t nk_pad = round_up(nk, kPaddedKeys);
    pack_transposed(k + row * D, nk, D, D, kT.data() + at * D, nk_pad);
    pack_rows(k + row * D, nk, D, D, kp.data() + at * D);
    pack_transposed(v + row * Dv, nk, Dv, Dv, vT.data() + at * Dv, nk_pad);
  }
  const at::BFloat16* kT_tile(int64_t slot, int64_t t) const { return kT.data() + (slot * slot_keys + tile_key[t]) * D; }
  const at::BFloat16* kp_tile(int64_t slot, int64_t t) const { return kp.data() + (slot * slot_keys + tile_key[t]) * D; }
  const at::BFloat16* vT_tile(int64_t slot, int64_t t) const { return vT.data() + (slot * slot_keys + tile_key[t]) * Dv; }
};

// The backward of bfloat16 on brgemm (see "bfloat16 on brgemm" above): the same
// loop as attention_bwd_kernel, its five tile products in bfloat16 with float32 accumulation.
// p and ds are rounded to bfloat16 for their products (as SDPA's backward does); dq and dk
// accumulate ds k and ds^T q unscaled and take the scale once at the end. dk and dv are
// accumulated transposed, dv^T += do^T p and dk^T += q^T ds, so that p and ds enter as B
// operands packed row pair by row pair (contiguous) instead of being transposed per tile.
// K^T, K, V^T are packed per key tile: once per (b, kv head) before the tasks where its
// chunks share keys (see BackwardPlan), else by the task of each chunk, its keys' tiles;
// per query block: q^T and do^T.
// Every product runs on a block's rows rounded up to kPaddedRows and a tile's keys rounded up
// to kPaddedKeys (the padding zeros), with leading dims from a small set, so that brgemm's
// kernels stay few over any sequence lengths (see kPaddedRows). A product whose padded keys
// would land in the next tile's columns (of p, ds, or the dk^T, dv^T partials) writes to a
// scratch tile, from which its real rows and keys are copied or added.
template <typename mask_t>
void attention_bwd_packed(const at::BFloat16* dout, const at::BFloat16* q, const at::BFloat16* k,
                          const at::BFloat16* v, const float* dlse, const MaskView<mask_t>& mask,
                          const Geometry& g, float scale, const KeyBand& band, const Dropout& drop,
                          at::BFloat16* dq, at::BFloat16* dk, at::BFloat16* dv, float* dmask) {
  using BF = at::BFloat16;
  namespace blas = at::native::cpublas;
  const int64_t D = g.D, Dv = g.Dv;
  // (a decoding row's products cost what 16 rows' do, padded: a group's heads in one item fill them)
  const BackwardPlan plan = backward_plan<float>(g, band, /*stacked_rows=*/kPaddedRows);
  const KeyGradPartials<float, BF> partials(plan, g, /*rows=*/false, scale, dk, dv);
  const int64_t block_q = plan.max_item_rows, rows_pad = round_up(block_q, kPaddedRows);
  constexpr int64_t kTileKeys = BackwardPackedKV::kTileKeys;  // also the scratch tile's leading dim
  const BackwardRowSteps<float, mask_t> steps{g, band, mask, dlse, dmask, drop};

  std::optional<BackwardPackedKV> shared_kv;  // every (b, kv head)'s, where its chunks share keys
  if (!plan.disjoint) {
    shared_kv.emplace(g.B * g.Hkv, g, plan.k_tiles);
    const int64_t tiles = plan.k_tiles.count();
    at::parallel_for(0, g.B * g.Hkv * tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task)
        shared_kv->pack(k, v, g, plan.k_tiles, task / tiles, task % tiles, task / tiles);
    });
  }

  at::parallel_for(0, g.B * g.Hkv * plan.chunks, 1, [&](int64_t begin, int64_t end) {
    BackwardRows<float> rows(block_q, plan.row_keys, band.softcap > 0);
    std::vector<float> dq_acc(rows_pad * D), own_parts, pd_buf;
    std::vector<char> dropped;  // per key tile of a query block: whether the mask drops it whole
    std::optional<BackwardPackedKV> own_kv;  // this task's (b, kv head), packed by the task
    std::vector<BF> q_pad, do_pad;  // an item's q and do rows followed by zero rows (padded_rows)
    std::vector<BF> q_gather, do_gather;  // a group's q and do rows, gathered (gathered_rows)
    std::vector<BF> qT(D * rows_pad), doT(Dv * rows_pad);  // A operands of dk^T, dv^T
    // p, ds packed in row pairs (B operands of dv^T, dk^T); ds plain (the A of dq)
    std::vector<BF> p_p(rows_pad * kTileKeys), ds_p(rows_pad * kTileKeys), ds_b(rows_pad * kTileKeys);
    std::vector<float> scratch(std::max({D, Dv, rows_pad}) * kTileKeys);  // a padded product's result
    // The nq x nk scores (or dp) of a tile, out = a b into `out` (rows.p or rows.ds at the tile's
    // first key; a: nq_pad rows of K, b: K x nk_pad packed): straight where nothing is padded,
    // else through the scratch tile, since the padding keys' columns may belong to the next
    // tile (packed documents), which may be one the mask dropped.
    auto scores_product = [&](int64_t nq, int64_t nq_pad, int64_t nk, int64_t K, const BF* a, const BF* b,
                              float* out) {
      const int64_t nk_pad = round_up(nk, kPaddedKeys);
      if (nq == nq_pad && nk == nk_pad) return blas::brgemm(nq, nk, K, K, nk, rows.ld, false, a, b, out, true);
      blas::brgemm(nq_pad, nk_pad, K, K, nk_pad, kTileKeys, false, a, b, scratch.data(), true);
      for (int64_t r = 0; r < nq; ++r) std::copy_n(scratch.data() + r * kTileKeys, nk, out + r * rows.ld);
    };
    // sumT (n_rows x the chunk's keys, leading dim ldc, from the tile's first key) += a b, a:
    // n_rows x nq_pad, b: nq_pad x nk_pad packed: straight where the keys are not padded, else
    // through the scratch tile.
    auto add_transposed_product = [&](int64_t n_rows, int64_t nq_pad, int64_t nk, const BF* a, const BF* b,
                                      float* sumT, int64_t ldc) {
      const int64_t nk_pad = round_up(nk, kPaddedKeys);
      if (nk == nk_pad) return blas::brgemm(n_rows, nk, nq_pad, nq_pad, nk, ldc, true, a, b, sumT, true);
      blas::brgemm(n_rows, nk_pad, nq_pad, nq_pad, nk_pad, kTileKeys, false, a, b, scratch.data(), true);
      for (int64_t r = 0; r < n_rows; ++r) {
        float* out = sumT + r * ldc;
        const float* in = scratch.data() + r * kTileKeys;
        for (int64_t j = 0; j < nk; ++j) out[j] += in[j];
      }
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % plan.chunks, bh = task / plan.chunks, b = bh / g.Hkv, hk = bh % g.Hkv;
      const auto [ck0, ck1] = plan.keys[c];  // the keys this chunk's rows see (whole tiles from ck0)
      // dk^T, dv^T of keys [ck0, ck1): (D, ck1 - ck0) and (Dv, ck1 - ck0), key ck0 first, row stride ldc
      const auto [dkT_acc, dvT_acc] = partials.chunk(bh, c, own_parts);
      const int64_t ldc = plan.partial_ld(c);
      if (!shared_kv) {
        if (!own_kv) own_kv.emplace(1, g, plan.k_tiles);
        const auto [t0, t1] = plan.key_tiles_of(ck0, ck1);
        for (int64_t t = t0; t < t1; ++t) own_kv->pack(k, v, g, plan.k_tiles, bh, t, 0);
      }
      const BackwardPackedKV& kv = shared_kv ? *shared_kv : *own_kv;
      const int64_t slot = shared_kv ? bh : 0;
      for (int64_t item = plan.first_item[c]; item < plan.first_item[c + 1]; ++item) {
        const BackwardItem& work = plan.item(item);
        const int64_t i0 = plan.q_tiles.begin(work.qb), rows_in_block = plan.q_tiles.size(work.qb);
        const ItemRows ir{b, hk * g.group() + work.h_lo, i0, rows_in_block, work.heads, g.Hq, g.Sq};
        const int64_t nq = ir.count(), nq_pad = round_up(nq, kPaddedRows), row0 = ir.global(0);
        // the item's q and do rows, contiguous: in place with one head, else a group's gathered
        const BF* q_rows = ir.heads == 1 ? q + row0 * D : gathered_rows(q, ir, D, q_gather);
        const BF* do_rows = ir.heads == 1 ? dout + row0 * Dv : gathered_rows(dout, ir, Dv, do_gather);
        const BF* qt = padded_rows(q_rows, nq, nq_pad, D, q_pad);      // the A of s = q K^T
        const BF* dot = padded_rows(do_rows, nq, nq_pad, Dv, do_pad);  // the A of dp = do V^T
        transpose_rows(q_rows, nq, D, qT.data(), nq_pad);
        transpose_rows(do_rows, nq, Dv, doT.data(), nq_pad);
        std::fill(dq_acc.begin(), dq_acc.begin() + nq_pad * D, 0.f);
        // the keys these rows see (the group's heads share their rows' positions)
        const auto [k0, k1] = visible_key_range(band, plan.k_tiles, i0, i0 + rows_in_block);
        rows.base = k0;
        steps.drop_masked_tiles(rows, plan.k_tiles, ir, k0, k1, dropped);
        const auto [t0, t1] = plan.key_tiles_of(k0, k1);
        auto live = [&](int64_t t) { return !dropped[t - t0]; };
        for (int64_t t = t0; t < t1; ++t) {  // s = q k^T, scaled (exactly as the forward), masked
          if (!live(t)) continue;
          const int64_t j0 = plan.k_tiles.begin(t), nk = plan.k_tiles.size(t);
          scores_product(nq, nq_pad, nk, D, qt, kv.kT_tile(slot, t), rows.p_at(0, j0));
          steps.mask_tile(rows, ir, j0, nk, scale);
        }
        steps.probs(rows, ir, k0, k1);
        for (int64_t t = t0; t < t1; ++t) {
          if (!live(t)) continue;
          const int64_t j0 = plan.k_tiles.begin(t), nk = plan.k_tiles.size(t), nk_pad = round_up(nk, kPaddedKeys);
          // dv^T += do^T p, p packed in row pairs
          const auto [pt, ldp] = steps.dv_probs(rows, ir, j0, nk, pd_buf);
          pack_rows_rounded(pt, nq, nk, ldp, p_p.data(), nq_pad, nk_pad);
          add_transposed_product(Dv, nq_pad, nk, doT.data(), p_p.data(), dvT_acc + (j0 - ck0), ldc);
          scores_product(nq, nq_pad, nk, Dv, dot, kv.vT_tile(slot, t), rows.ds_at(0, j0));  // dp = do v^T
        }
        steps.grads(rows, ir, k0, k1);  // ds = p (dp - delta + dlse)
        for (int64_t t = t0; t < t1; ++t) {
          if (!live(t)) continue;
          const int64_t j0 = plan.k_tiles.begin(t), nk = plan.k_tiles.size(t), nk_pad = round_up(nk, kPaddedKeys);
          for (int64_t r = 0; r < nq; ++r) {  // ds in bfloat16 (nq_pad x nk_pad, zeros past nq, nk), for dq += ds k
            BF* dsr = ds_b.data() + r * nk_pad;
            round_row(rows.ds_at(r, j0), dsr, nk);
            std::fill(dsr + nk, dsr + nk_pad, BF(0.f));
          }
          std::fill(ds_b.begin() + nq * nk_pad, ds_b.begin() + nq_pad * nk_pad, BF(0.f));
          blas::brgemm(nq_pad, D, nk_pad, nk_pad, D, D, true, ds_b.data(), kv.kp_tile(slot, t), dq_acc.data(), true);
          pack_rows_rounded(rows.ds_at(0, j0), nq, nk, rows.ld, ds_p.data(), nq_pad, nk_pad);  // dk^T += q^T ds
          add_transposed_product(D, nq_pad, nk, qT.data(), ds_p.data(), dkT_acc + (j0 - ck0), ldc);
        }
        for (int64_t r = 0; r < nq; ++r) {
          BF* dq_row = dq + ir.global(r) * D;
          for (int64_t d = 0; d < D; ++d) dq_row[d] = BF(dq_acc[r * D + d] * scale);
        }
      }
      partials.task_done(bh, c, own_parts);
    }
    blas::brgemm_release(true);
  });
  partials.write_all();
}

bool head_dim_contiguous(const Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1; }

// q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv).
Geometry geometry(const Tensor& q, const Tensor& k, const Tensor& v, bool contiguous) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && v.sizes().slice(0, 3) == k.sizes().slice(0, 3) &&
                  q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "lmfast_C: q (B, Hq, Sq, D), k (B, Hkv, Sk, D) and v (B, Hkv, Sk, Dv) must be CPU tensors");
  TORCH_CHECK(contiguous ? q.is_contiguous() && k.is_contiguous() && v.is_contiguous()
                         : head_dim_contiguous(q) && head_dim_contiguous(k) && head_dim_contiguous(v),
              contiguous ? "lmfast_C: the backward's q, k, v must be contiguous"
                         : "lmfast_C: q, k, v must have a contiguous head dim (stride 1)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "lmfast_C: q, k, v must share a dtype");
  Geometry g{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == g.B && k.size(3) == g.D && g.Hkv > 0 && g.Hq % g.Hkv == 0,
              "lmfast_C: q and k/v shapes do not fit (batch, head dim, or head groups)");
  return g;
}

void check_mask(const std::optional<Tensor>& mask, const Tensor& q, const Geometry& g) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->device().is_cpu() && mask->dim() == 4 && mask->size(0) == g.B &&
                  mask->size(1) == g.Hq && mask->size(2) == g.Sq && mask->size(3) == g.Sk,
              "lmfast_C: mask must be expanded to (B, Hq, Sq, Sk)");
  TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == q.scalar_type(),
              "lmfast_C: mask must be bool or have q's dtype");
}

KeyBand key_band(const Geometry& g, bool causal, std::optional<int64_t> window, double softcap,
                 const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k) {
  TORCH_CHECK(!window.has_value() || *window >= 1, "lmfast_C: window must be >= 1");
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "lmfast_C: softcap must be finite and >= 0 (0: none)");
  KeyBand band{causal, window.value_or(0), g.Sk - g.Sq, g.Sk, softcap};
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "lmfast_C: cu_seqlens_q and cu_seqlens_k go together");
  if (cu_seqlens_q.has_value()) {
    for (const Tensor* t : {&*cu_seqlens_q, &*cu_seqlens_k})
      TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->numel() >= 1 &&
                      (t->scalar_type() == at::kInt || t->scalar_type() == at::kLong),
                  "lmfast_C: cu_seqlens_q and cu_seqlens_k must be (n + 1,) int32/int64 CPU tensors");
    TORCH_CHECK(cu_seqlens_q->numel() == cu_seqlens_k->numel() && g.B == 1,
                "lmfast_C: cu_seqlens_q and cu_seqlens_k must have one length, and q a batch size of 1");
    band.documents = documents::key_bands_on_host(*cu_seqlens_q, *cu_seqlens_k, g.Sq, g.Sk, causal, window,
                                                  band.cu_q, band.cu_k);
    band.doc_lo = band.documents.const_data_ptr<int32_t>();
    band.doc_hi = band.doc_lo + g.Sq;
  }
  return band;
}

// Runs fn<mask_t>() with mask_t = bool or scalar_t as the mask's dtype says.
template <typename scalar_t, typename F>
void with_mask_type(const std::optional<Tensor>& mask, const F& fn) {
  if (mask.has_value() && mask->scalar_type() == at::kBool) {
    fn(mask_view<bool>(mask));
  } else {
    fn(mask_view<scalar_t>(mask));
  }
}

}  // namespace

// Which unit multiplies bfloat16 attention tiles here: "amx" (AMX-BF16: oneDNN reports
// packing, cpublas::could_pack), "avx512bf16" (AVX512-BF16's dot-product instruction, which
// oneDNN's brgemm also runs: 520 GFLOP/s a core against sgemm's 200, measured on an AMD EPYC
// Zen 5), or "sgemm" (tiles widened to float32). brgemm is used only where it runs bfloat16
// natively and its VNNI layout checks out; LMFAST_CPU_BRGEMM=0 turns it off.
const char* bf16_attention_unit() {
  static const char* unit = [] {
    const char* env = std::getenv("LMFAST_CPU_BRGEMM");
    if (env != nullptr && std::string(env) == "0") return "sgemm";
    const char* native = at::native::cpublas::could_pack(at::kBFloat16) ? "amx" : nullptr;
#if defined(__x86_64__)
    if (native == nullptr && __builtin_cpu_supports("avx512bf16")) native = "avx512bf16";
#endif
    return native != nullptr && brgemm_bf16_computes_vnni() ? native : "sgemm";
  }();
  return unit;
}

std::tuple<Tensor, Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const std::optional<Tensor>& mask, double scale,
                                                 bool causal, std::optional<int64_t> window,
                                                 double dropout_p,
                                                 const std::optional<Tensor>& dropout_seed, double softcap,
                                                 const std::optional<Tensor>& cu_seqlens_q,
                                                 const std::optional<Tensor>& cu_seqlens_k) {
  const Geometry g = geometry(q, k, v, /*contiguous=*/false);
  check_mask(mask, q, g);
  const KeyBand band = key_band(g, causal, window, softcap, cu_seqlens_q, cu_seqlens_k);
  const Dropout drop = dropout_of(dropout_p, dropout_seed);
  // (B, Sq, Hq, Dv) memory seen as (B, Hq, Sq, Dv): o.transpose(1, 2) is contiguous.
  Tensor o = at::empty({g.B, g.Sq, g.Hq, g.Dv}, q.options()).transpose(1, 2);
  const auto acc_options = q.options().dtype(at::toOpMathType(q.scalar_type()));
  Tensor lse = at::empty({g.B, g.Hq, g.Sq}, acc_options);
  Tensor row_stats = at::empty({2, g.B, g.Hq, g.Sq}, acc_options);
  if (q.numel() == 0 && lse.numel() == 0) return {o, lse, row_stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lmfast_attention_fwd", [&] {
    with_mask_type<scalar_t>(mask, [&](auto mv) {
      attention_fwd_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                     v.const_data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                     lse.data_ptr<at::opmath_type<scalar_t>>(),
                                     row_stats.data_ptr<at::opmath_type<scalar_t>>(), mv, g, Rows(q), Rows(k),
                                     Rows(v), Rows(o), scale, band, drop);
    });
  });
  return {o, lse, row_stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
    const Tensor& row_stats, const std::optional<Tensor>& dlse, const std::optional<Tensor>& mask,
    double scale, bool causal, std::optional<int64_t> window, bool mask_grad, double dropout_p,
    const std::optional<Tensor>& dropout_seed, double softcap, const std::optional<Tensor>& cu_seqlens_q,
    const std::optional<Tensor>& cu_seqlens_k) {
  const Geometry g = geometry(q, k, v, /*contiguous=*/true);
  const Dropout drop = dropout_of(dropout_p, dropout_seed);
  check_mask(mask, q, g);
  TORCH_CHECK(dout.sizes() == o.sizes() && o.sizes().slice(0, 3) == q.sizes().slice(0, 3) && o.size(3) == g.Dv &&
                  dout.is_contiguous() && o.is_contiguous() && dout.scalar_type() == q.scalar_type(),
              "lmfast_C: dout and o must be contiguous and shaped (B, Hq, Sq, Dv)");
  // row_stats is checked, not read: this backward recomputes each row's max and sum (above)
  const auto acc_type = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(row_stats.numel() == 2 * g.B * g.Hq * g.Sq && row_stats.scalar_type() == acc_type,
              "lmfast_C: row_stats must be a (2, B, Hq, Sq) tensor in the accumulation dtype, got ",
              row_stats.sizes(), " ", row_stats.scalar_type());
  TORCH_CHECK(!dlse.has_value() || (dlse->numel() == g.B * g.Hq * g.Sq && dlse->is_contiguous() &&
                                    dlse->scalar_type() == acc_type),
              "lmfast_C: dlse must be a contiguous (B, Hq, Sq) tensor in the accumulation dtype");
  const KeyBand band = key_band(g, causal, window, softcap, cu_seqlens_q, cu_seqlens_k);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  // dmask in the accumulation dtype, unrounded: the autograd sums it over the mask's broadcast
  // dims before rounding to the mask's dtype (ops.h)
  const auto acc_opts = q.options().dtype(acc_type);
  Tensor dmask = mask_grad ? at::zeros({g.B, g.Hq, g.Sq, g.Sk}, acc_opts) : at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lmfast_attention_bwd", [&] {
    with_mask_type<scalar_t>(mask, [&](auto mv) {
      attention_bwd_kernel<scalar_t>(
          dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(),
          dlse.has_value() ? dlse->const_data_ptr<at::opmath_type<scalar_t>>() : nullptr, mv, g,
          scale, band, drop, dq.data_ptr<scalar_t>(),
          dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
          mask_grad ? dmask.data_ptr<at::opmath_type<scalar_t>>() : nullptr);
    });
  });
  return {dq, dk, dv, dmask};
}

}  // namespace lmfast::cpu
