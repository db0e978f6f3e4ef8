// Host emulation of the WMMA API (nvcuda::wmma) for 16x16x16 tiles, as csrc/cuda/attention.cu
// uses it. A real fragment holds one lane's share of the tile in an unspecified layout; here
// every lane's fragment holds the whole tile (the kernels never index a fragment), and the
// product is computed in float32 from exactly converted inputs, as tensor cores take them.
//
// What a GPU would reject is checked: 32-byte aligned tile pointers and a leading dimension
// that is a multiple of 16 bytes. Stores are split between the lanes (each writes every 32nd
// element), as on a GPU: a lane that reads the stored tile without a __syncwarp first may see
// elements another lane has not written yet, and the emulator's fiber order exposes that.
#pragma once

#include <cuda_runtime.h>

namespace lmfast_emulation {
void check_aligned(const void* p, size_t bytes, const char* file, int line);
void report_error(const char* what);
}  // namespace lmfast_emulation

namespace nvcuda::wmma {

struct matrix_a;
struct matrix_b;
struct accumulator;
struct row_major;
struct col_major;
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has the 16x16x16 shape only");
  float v[16][16];  // element (row, col) of the tile
};

namespace detail {
template <typename T>
void check_tile(const T* p, unsigned ldm) {
  lmfast_emulation::check_aligned(p, 32, "wmma tile pointer", 0);
  if ((ldm * sizeof(T)) % 16 != 0) lmfast_emulation::report_error("wmma: ldm is not a multiple of 16 bytes");
}
template <typename T>
void load(float (&v)[16][16], const T* p, unsigned ldm, bool row_major) {
  check_tile(p, ldm);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) v[r][c] = static_cast<float>(row_major ? p[r * ldm + c] : p[c * ldm + r]);
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
  detail::load(f.v, p, ldm, std::is_same_v<Layout, row_major>);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::load(f.v, p, ldm, layout == mem_row_major);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_tile(p, ldm);
  for (int e = int(threadIdx.x & 31); e < 256; e += 32) {  // this lane's share
    const int r = e / 16, c = e % 16;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
  }
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (auto& row : f.v)
    for (float& x : row) x = value;
}

template <typename T, typename La, typename Lb>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, La>& a,
              const fragment<matrix_b, 16, 16, 16, T, Lb>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) {
      float acc = c.v[r][col];
      for (int k = 0; k < 16; ++k) acc = std::fma(a.v[r][k], b.v[k][col], acc);
      out[r][col] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}

}  // namespace nvcuda::wmma
