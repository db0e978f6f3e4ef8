// The CUDA kernels' launch interface: what each .cu file exports to ops.cpp, in raw pointers,
// sizes and a stream. No ATen here, and none in the .cu files: nvcc parses a .cu file once
// for the host and once per GPU architecture, and ATen's headers cost ~30 s of the ~45-65 s
// each file took with them (this machine, sm_80 + sm_90). ops.cpp, host C++ alone, does the
// tensor work of all three op families (checks, allocation, device guard, stream) once.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lmfast::cuda {

// The element type of a launch's tensors (the kernels compute in float32).
enum class Dtype { kFloat32, kFloat16, kBFloat16 };

// Device memory for a launch's partial results, on its device and stream. ops.cpp hands it
// out from PyTorch's caching allocator and keeps it until the launches are queued.
class Workspace {
 public:
  virtual void* allocate(size_t bytes) = 0;

 protected:
  ~Workspace() = default;
};

// ---- LayerNorm / RMSNorm (norm.cu) -----------------------------------------------------------
// Rows of N elements. nullptr: an absent input (no residual, weight, bias) or an output not
// wanted (s_out without a residual, mean for RMSNorm, dw/db without their gradient).

struct NormFwdArgs {
  Dtype dtype;
  bool centered;  // LayerNorm (mean subtracted) or RMSNorm
  const void* x;
  const void* residual;
  const void* weight;
  const void* bias;
  void* y;
  void* s_out;  // x + residual
  float* mean;  // (rows,)
  float* rstd;  // (rows,)
  int64_t rows, N;
  double eps, w_offset;  // w_offset: RMSNorm's scale is w_offset + weight
};
void launch_norm_fwd(const NormFwdArgs& a, cudaStream_t stream);

struct NormBwdArgs {
  Dtype dtype;
  bool centered;
  const void* dy;
  const void* x;
  const void* weight;
  const float* mean;
  const float* rstd;
  const void* dres;  // the gradient of the residual sum s_out, added to dx
  void* dx;
  void* dw;  // (N,)
  void* db;  // (N,)
  int64_t rows, N;
  double eps, w_offset;
};
void launch_norm_bwd(const NormBwdArgs& a, Workspace& workspace, cudaStream_t stream);

// ---- softmax (softmax.cu) -------------------------------------------------------------------

enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kAdditiveMask = 2 };

// A mask's strides in elements (0 along broadcast dims), over (B, H, M, N).
struct MaskStrides {
  int64_t b, h, m, n;
};

struct SoftmaxFwdArgs {
  Dtype dtype;
  const void* x;     // (B, H, M, N), rows = B H M
  const void* mask;  // bool, or x's dtype (additive)
  MaskKind mask_kind;
  MaskStrides mask_strides;
  void* y;
  int64_t H, M, rows, N;
  float scale;
  bool causal;
};
void launch_softmax_fwd(const SoftmaxFwdArgs& a, cudaStream_t stream);

struct SoftmaxBwdArgs {
  Dtype dtype;
  const void* dy;
  const void* y;
  void* dx;
  int64_t rows, N;
  float scale;
};
void launch_softmax_bwd(const SoftmaxBwdArgs& a, cudaStream_t stream);

// ---- attention forward (attention.cu) --------------------------------------------------------

// What every attention kernel reads.
struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;  // bool (uint8) or q's dtype, read through its strides
  void* o;           // (B, Sq, Hq, Dv) contiguous
  float* lse;        // (B, Hq, Sq)
  float* row_stats;  // (2, B, Hq, Sq): m, 1 / l (store_row_softmax)
  int64_t q_strides[3], k_strides[3], v_strides[3];  // batch, head, row (the head dim is contiguous)
  int64_t mask_strides[4];                            // 0 along broadcast dims
  int mask_kind;
  int B, Hq, Hkv, Sq, Sk, D;
  int Dv;  // v's and o's head dim
  float scale;
  float softcap;  // > 0: s = softcap * tanh(s / softcap) before the mask (Gemma 2); 0: none
  bool causal;
  int window;  // 0: none
  // packed documents (../documents.h), or nullptr: (2 Sq + n_docs + 2,) int32, each row's [lo, hi)
  // keys (lo's, then hi's), cu_seqlens_q (the prefill blocks' runs of one document), the check
  const int* doc_bands;
  int n_docs;
  // dropout (dropout_seed == nullptr: none): an int64 seed in device memory, the threshold
  // below which an entry's hash drops it, and 1 / (1 - dropout_p)
  const int64_t* dropout_seed;
  uint32_t drop_threshold;
  float keep_scale;
};

// o, lse and the row stats of p (Sk >= 1, B Hq Sq >= 1; head dims up to 256). vec16: every
// row of q, k and v starts 16-byte aligned and D, Dv are whole 16-byte vectors.
void launch_attention_fwd(const AttnParams& p, Dtype dtype, bool vec16, Workspace& workspace, cudaStream_t stream);

// Packed documents' table into bands, (2 Sq + n_docs + 2,) int32 (ops.h: document_bands), from
// the boundaries cu_q and cu_k (n_docs + 1 each, int32 or int64, `stride` elements apart).
// window: documents::window_for_bands's.
void launch_document_bands(const void* cu_q, bool q_int32, int64_t stride_q, const void* cu_k, bool k_int32,
                           int64_t stride_k, int64_t n_docs, int64_t Sq, int64_t Sk, bool causal, int64_t window,
                           int* bands, cudaStream_t stream);

}  // namespace lmfast::cuda
