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
#pragma once

// (ATen's per-op headers, not ATen/ATen.h: nvcc reads this from attention.cu, where the whole
// of ATen cost ~16 s of compile time)
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/stack.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

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
// decrease, end at `end` (Sq or Sk).
inline void check_boundaries(const char* name, const std::vector<int64_t>& x, int64_t end, bool is_q) {
  const int64_t n = static_cast<int64_t>(x.size());
  TORCH_CHECK_VALUE(n >= 1 && x[0] == 0, name, " must start at 0, got ", n >= 1 ? x[0] : -1);
  for (int64_t d = 1; d < n; ++d)
    TORCH_CHECK_VALUE(x[d] >= x[d - 1], name, " must not decrease, got ", x[d - 1], " then ", x[d], " at index ", d);
  TORCH_CHECK_VALUE(x[n - 1] == end, name, " must end at ", is_q ? "Sq = " : "Sk = ", end,
                    " (every row in a document), got ", x[n - 1]);
}

// The values' rules (the shapes, dtypes and device are checked before): on the host for CPU
// tensors (a ValueError naming the argument); on a GPU an asynchronous device assert, so that
// no call waits on the device.
inline void check_values(const Tensor& cu_q, const Tensor& cu_k, int64_t Sq, int64_t Sk) {
  if (cu_q.is_cpu()) {
    check_boundaries("cu_seqlens_q", read_boundaries(cu_q), Sq, true);
    check_boundaries("cu_seqlens_k", read_boundaries(cu_k), Sk, false);
    return;
  }
  const std::pair<const char*, const Tensor*> args[2] = {{"cu_seqlens_q", &cu_q}, {"cu_seqlens_k", &cu_k}};
  const int64_t ends[2] = {Sq, Sk};
  for (int a = 0; a < 2; ++a) {
    const Tensor c = args[a].second->to(at::kLong);
    const int64_t n = c.numel();
    const Tensor ok = (c.select(0, 0) == 0) & (c.select(0, n - 1) == ends[a]) &
                      (n > 1 ? (c.slice(0, 1) >= c.slice(0, 0, n - 1)).all() : c.select(0, 0) == 0);
    at::_assert_async(ok, std::string(args[a].first) + " must start at 0, not decrease, and end at the " +
                              (a == 0 ? "query" : "key") + " count");
  }
}

// The (2, Sq) int32 table of key_bands from checked host boundaries.
inline Tensor key_bands_from(const std::vector<int64_t>& cq, const std::vector<int64_t>& ck, int64_t Sq,
                             int64_t Sk, bool causal, std::optional<int64_t> window) {
  Tensor bands = at::empty({2, Sq}, at::TensorOptions().dtype(at::kInt));
  int32_t* lo = bands.data_ptr<int32_t>();
  int32_t* hi = lo + Sq;
  for (size_t d = 0; d + 1 < cq.size(); ++d) {
    const int64_t ks = ck[d], ke = ck[d + 1], shift = ke - cq[d + 1];  // pos_i = i + shift
    for (int64_t i = cq[d]; i < cq[d + 1]; ++i) {
      const int64_t pos = i + shift;
      const int64_t l = window.has_value() ? std::max(ks, pos - (*window - 1)) : ks;
      const int64_t h = causal ? std::min(ke, pos + 1) : ke;
      lo[i] = static_cast<int32_t>(std::clamp<int64_t>(l, 0, Sk));
      hi[i] = static_cast<int32_t>(std::max<int64_t>(std::clamp<int64_t>(h, 0, Sk), lo[i]));
    }
  }
  return bands;
}

// key_bands for CPU tensors (the CPU kernels' path): the same table from one pass over the rows
// on the host, and the boundaries it read (cq, ck), checked. The CPU kernels pay this per call
// (a decode step of many sequences included), not ~10 small tensor ops; both paths are tested
// against the float64 reference (the C++ CPU kernels and the emulated CUDA ones).
inline Tensor key_bands_on_host(const Tensor& cu_q, const Tensor& cu_k, int64_t Sq, int64_t Sk, bool causal,
                                std::optional<int64_t> window, std::vector<int64_t>& cq, std::vector<int64_t>& ck) {
  cq = read_boundaries(cu_q);
  ck = read_boundaries(cu_k);
  check_boundaries("cu_seqlens_q", cq, Sq, true);
  check_boundaries("cu_seqlens_k", ck, Sk, false);
  return key_bands_from(cq, ck, Sq, Sk, causal, window);
}

// (2, Sq) int32 on cu_q's device: [0] lo_i, [1] hi_i (above), by tensor ops on that device:
// the GPU kernels' path (nothing is copied to the host, no call waits on the device; the CUDA
// emulator runs it on CPU tensors). Checks the values first (check_values).
inline Tensor key_bands(const Tensor& cu_q, const Tensor& cu_k, int64_t Sq, int64_t Sk, bool causal,
                        std::optional<int64_t> window) {
  check_values(cu_q, cu_k, Sq, Sk);
  const auto opts = cu_q.options().dtype(at::kLong);
  if (Sq == 0) return at::empty({2, 0}, opts.dtype(at::kInt));
  const Tensor cq = cu_q.to(at::kLong), ck = cu_k.to(at::kLong);
  const int64_t n = cq.numel() - 1;  // documents
  TORCH_CHECK_VALUE(n >= 1, "cu_seqlens_q holds no document but q has ", Sq, " rows");
  const Tensor i = at::arange(Sq, opts);                                 // (Sq,)
  const Tensor doc = at::searchsorted(cq.slice(0, 1), i, /*out_int32=*/false, /*right=*/true).clamp_max(n - 1);
  const Tensor ke = ck.index_select(0, doc + 1);
  const Tensor pos = i + ke - cq.index_select(0, doc + 1);               // key position of each query
  Tensor lo = ck.index_select(0, doc), hi = ke;
  if (window.has_value()) lo = at::maximum(lo, pos - (*window - 1));
  if (causal) hi = at::minimum(hi, pos + 1);
  // (clamped to [0, Sk]: on a GPU, values the assert above rejects are still read first)
  lo = lo.clamp(0, Sk);
  return at::stack({lo, at::maximum(hi.clamp(0, Sk), lo)}).to(at::kInt);
}

}  // namespace lmfast::documents
