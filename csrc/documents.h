// Packed documents (variable-length attention, FlashAttention's cu_seqlens): the kernels'
// per-row key bands.
//
// cu_seqlens_q and cu_seqlens_k, int32 or int64 of shape (n + 1,) on q's device, cut the query
// rows and the keys of a batch of one into n documents: document d holds queries
// [cu_seqlens_q[d], cu_seqlens_q[d + 1]) and keys [cu_seqlens_k[d], cu_seqlens_k[d + 1]). A
// query sees only its own document's keys, and `causal` / `window` apply inside the document,
// bottom-right aligned as everywhere in lmfast: query i of document d sits at key position
//     pos_i = i + cu_seqlens_k[d + 1] - cu_seqlens_q[d + 1].
// The kernels take this as a table of each query row's visible keys [lo_i, hi_i):
//     lo_i = max(ks, pos_i - window + 1 if window),  hi_i = max(lo_i, min(ke, pos_i + 1 if causal))
// (ks, ke: the document's first and end key). Both ends are nondecreasing in i, as they are for
// plain causal/window bands, so every kernel's tile skipping (a block of rows sees one
// contiguous run of keys) holds unchanged.
//
// This header is the arithmetic alone, without ATen: the CUDA kernels' files include it (they
// stay free of ATen's headers, csrc/cuda/kernels.h). The tables on the host, from CPU tensors,
// are in document_tables.h.
#pragma once

#include <cstdint>
#include <optional>

// (nvcc compiles the arithmetic below for the device too: the CUDA kernels build the table on
// the GPU, csrc/cuda/attention.cu; the host compiler, the emulator's included, for the host)
#if defined(__CUDACC__)
#define LMFAST_HOST_DEVICE __host__ __device__
#else
#define LMFAST_HOST_DEVICE
#endif

namespace lmfast::documents {

// Query row i of a document with keys [ks, ke) whose rows end at qe: its visible keys [lo, hi)
// as above (window 0: none), clamped to [0, Sk] (on a GPU, values the check rejects are still
// read first), hi >= lo. The one formula of the table, for the host loop and the CUDA kernel.
struct RowBand {
  int64_t lo, hi;
};
LMFAST_HOST_DEVICE inline RowBand row_band(int64_t i, int64_t ks, int64_t ke, int64_t qe, int64_t Sk, bool causal,
                                           int64_t window) {
  const int64_t pos = i + ke - qe;  // key position of the query
  int64_t lo = window > 0 && pos - (window - 1) > ks ? pos - (window - 1) : ks;
  int64_t hi = causal && pos + 1 < ke ? pos + 1 : ke;
  lo = lo < 0 ? 0 : lo > Sk ? Sk : lo;
  hi = hi < 0 ? 0 : hi > Sk ? Sk : hi;
  return {lo, hi < lo ? lo : hi};
}

// row_band's window argument: 0 for none, and none past Sk + 1, which limits no row (and keeps
// pos - (window - 1) far from overflowing).
inline int64_t window_for_bands(std::optional<int64_t> window, int64_t Sk) {
  return window.has_value() ? (*window < Sk + 1 ? *window : Sk + 1) : 0;
}

// The document of row x: how many of the boundaries cu[1 .. n_docs] (`stride` elements apart)
// are <= x, at most n_docs - 1 (n_docs >= 1). A binary search: one thread a row on the GPU.
template <typename index_t>
LMFAST_HOST_DEVICE inline int64_t document_of(const index_t* cu, int64_t stride, int64_t n_docs, int64_t x) {
  int64_t a = 0, b = n_docs;
  while (a < b) {
    const int64_t mid = (a + b) / 2;
    if (static_cast<int64_t>(cu[(mid + 1) * stride]) <= x) a = mid + 1;
    else b = mid;
  }
  return a < n_docs - 1 ? a : n_docs - 1;
}

// A GPU kernel's run of one document's rows under packed documents, so that no block of rows
// mixes documents: program pid of length / block + n_docs takes rows [start, end) of one
// document inside one aligned block of `block` rows (start = end: none). Document d owns
// programs [P(d), P(d + 1)), P(d) = cu[d] / block + d (increasing in d): one per aligned block
// its rows meet, and one left empty where it ends on a block boundary or holds no row. cu: the
// boundaries, contiguous and inside [0, length] (the table's copy), n_docs >= 1. (The Triton
// kernels' _document_run is the same mapping.)
struct Run {
  int64_t start, end;
};
LMFAST_HOST_DEVICE inline Run document_run(int64_t pid, const int* cu, int64_t n_docs, int64_t block) {
  int64_t lo = 0, hi = n_docs - 1;  // the last document d with P(d) <= pid
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] / block + mid <= pid) lo = mid;
    else hi = mid - 1;
  }
  const int64_t aligned = (pid - lo) * block;  // the program's aligned block
  const int64_t first = cu[lo], last = cu[lo + 1];
  const int64_t end = last < aligned + block ? last : aligned + block, start = first > aligned ? first : aligned;
  return {start < end ? start : end, end};  // (empty: start = end, inside [0, length] whatever the boundaries)
}

}  // namespace lmfast::documents
