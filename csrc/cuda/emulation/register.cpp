// The emulated CUDA kernel ops, as lmfast_cuda_emulation::<op>: the same entry points as
// lmfast_C's CUDA kernels (csrc/cuda/launch.h), taking CPU tensors.
#include <torch/library.h>

#include "../launch.h"

TORCH_LIBRARY(lmfast_cuda_emulation, m) {
  namespace c = lmfast::cuda;
  m.def("layer_norm_fwd", &c::layer_norm_fwd);
  m.def("layer_norm_bwd", &c::layer_norm_bwd);
  m.def("rms_norm_fwd", &c::rms_norm_fwd);
  m.def("rms_norm_bwd", &c::rms_norm_bwd);
  m.def("softmax_fwd", &c::softmax_fwd);
  m.def("softmax_bwd", &c::softmax_bwd);
  m.def("attention_fwd", &c::attention_fwd);
}
