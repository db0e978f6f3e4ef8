// lmfast._cuda: the CUDA kernels of the lmfast_C kernel ops, registered for the CUDA
// dispatch key (the ops themselves, their checks and autograd live in lmfast._C, which must
// be loaded first: lmfast/_extension.py loads this library after it). The public ops
// (lmfast_C::layer_norm, ...) then run on CUDA tensors as they do on CPU ones: this is
// backend="cuda". attention_bwd has no CUDA C++ kernel: lmfast/ops/attention.py registers
// the Triton backward for its CUDA key.
#include <Python.h>
#include <cuda_runtime.h>  // CUDART_VERSION
#include <torch/library.h>

#include <string>

#include "ops.h"

#ifndef LMFAST_TORCH_VERSION
#define LMFAST_TORCH_VERSION unknown
#endif
#ifndef LMFAST_CUDA_ARCHS
#define LMFAST_CUDA_ARCHS unknown
#endif
#define LMFAST_STR2(x) #x
#define LMFAST_STR(x) LMFAST_STR2(x)

namespace {

// "torch=<built against>;cuda=<toolkit major.minor>;archs=<compute capabilities>"
std::string cuda_build_info() {
  return "torch=" LMFAST_STR(LMFAST_TORCH_VERSION) ";cuda=" + std::to_string(CUDART_VERSION / 1000) + "." +
         std::to_string(CUDART_VERSION % 1000 / 10) + ";archs=" LMFAST_STR(LMFAST_CUDA_ARCHS);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmfast_C, m) { m.def("cuda_build_info() -> str", &cuda_build_info); }

TORCH_LIBRARY_IMPL(lmfast_C, CUDA, m) {
  namespace c = lmfast::cuda;
  m.impl("layer_norm_fwd", &c::layer_norm_fwd);
  m.impl("layer_norm_bwd", &c::layer_norm_bwd);
  m.impl("rms_norm_fwd", &c::rms_norm_fwd);
  m.impl("rms_norm_bwd", &c::rms_norm_bwd);
  m.impl("softmax_fwd", &c::softmax_fwd);
  m.impl("softmax_bwd", &c::softmax_bwd);
  m.impl("attention_fwd", &c::attention_fwd);
}

static PyModuleDef lmfast_cuda_module = {PyModuleDef_HEAD_INIT, "_cuda",
                                         "lmfast CUDA kernels; ops live in torch.ops.lmfast_C", -1, nullptr};
PyMODINIT_FUNC PyInit__cuda(void) { return PyModule_Create(&lmfast_cuda_module); }
