// Packed documents' key-band tables on the host, from CPU cu_seqlens tensors: the CPU kernels'
// path, and the values' checks with ValueErrors (the CUDA emulator's path too). The arithmetic
// they share with the CUDA kernels is documents.h's.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "documents.h"

namespace lmfast::documents {

using at::Tensor;

// The boundaries of a CPU cu_seqlens tensor (int32 or int64, any stride), read once.
inline std::vector<int64_t> read_boundaries(const Tensor& c) {
  std::vector<int64_t> x(c.numel());
  const int64_t stride = c.stride(0);
  if (c.scalar_type() == at::kInt) {
    const int32_t* p = c.const_data_ptr<int32_t>();
    for (size_t d = 0; d < x.size(); ++d) x[d] = p[d * stride];
  } else {
    const int64_t* p = c.const_data_ptr<int64_t>();
    for (size_t d = 0; d < x.size(); ++d) x[d] = p[d * stride];
  }
  return x;
}

// The values' rules on the host (a ValueError naming the argument): start at 0, never
// decrease, end at `end` (Sq or Sk). (On a GPU the kernel that builds the table checks them:
// csrc/cuda/attention.cu, document_bands.)
inline void check_boundaries(const char* name, const std::vector<int64_t>& x, int64_t end, bool is_q) {
  const int64_t n = static_cast<int64_t>(x.size());
  TORCH_CHECK_VALUE(n >= 1 && x[0] == 0, name, " must start at 0, got ", n >= 1 ? x[0] : -1);
  for (int64_t d = 1; d < n; ++d)
    TORCH_CHECK_VALUE(x[d] >= x[d - 1], name, " must not decrease, got ", x[d - 1], " then ", x[d], " at index ", d);
  TORCH_CHECK_VALUE(x[n - 1] == end, name, " must end at ", is_q ? "Sq = " : "Sk = ", end,
                    " (every row in a document), got ", x[n - 1]);
}

// The (2, Sq) int32 table, [0] lo_i and [1] hi_i, from checked host boundaries: one pass over
// the rows, document by document.
inline Tensor key_bands_from(const std::vector<int64_t>& cq, const std::vector<int64_t>& ck, int64_t Sq,
                             int64_t Sk, bool causal, std::optional<int64_t> window) {
  Tensor bands = at::empty({2, Sq}, at::TensorOptions().dtype(at::kInt));
  int32_t* lo = bands.data_ptr<int32_t>();
  int32_t* hi = lo + Sq;
  const int64_t w = window_for_bands(window, Sk);
  for (size_t d = 0; d + 1 < cq.size(); ++d) {
    for (int64_t i = cq[d]; i < cq[d + 1]; ++i) {
      const RowBand band = row_band(i, ck[d], ck[d + 1], cq[d + 1], Sk, causal, w);
      lo[i] = static_cast<int32_t>(band.lo);
      hi[i] = static_cast<int32_t>(band.hi);
    }
  }
  return bands;
}

// key_bands_from for CPU tensors (the CPU kernels' path): the boundaries read (cq, ck) and
// checked, then the table. The CPU kernels pay this per call (a decode step of many sequences
// included), not ~10 small tensor ops.
inline Tensor key_bands_on_host(const Tensor& cu_q, const Tensor& cu_k, int64_t Sq, int64_t Sk, bool causal,
                                std::optional<int64_t> window, std::vector<int64_t>& cq, std::vector<int64_t>& ck) {
  cq = read_boundaries(cu_q);
  ck = read_boundaries(cu_k);
  check_boundaries("cu_seqlens_q", cq, Sq, true);
  check_boundaries("cu_seqlens_k", ck, Sk, false);
  return key_bands_from(cq, ck, Sq, Sk, causal, window);
}

}  // namespace lmfast::documents
