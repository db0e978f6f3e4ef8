// The table of CPU kernels one kernel library exports.
//
// The kernels (csrc/cpu/*.cpp) are compiled once per ISA level, each level into its own
// shared library (lmfast/_cpu_<level>.so: avx512bf16, avx512, avx2, default; see lmfast/_build_flags.py),
// with that level's -march and hidden visibility, so that no inline function compiled for
// AVX-512 can stand in for another library's copy. lmfast._C, compiled for the baseline ISA,
// holds the op registrations and loads the one library this CPU runs best
// (lmfast/_extension.py picks it; csrc/dispatch.cpp loads it), then calls the kernels through
// this table.
#pragma once

#include "../ops.h"

namespace lmfast::cpu {

// Bumped whenever the table or a kernel signature changes: _C refuses a library of another.
constexpr int kKernelTableVersion = 7;

struct KernelTable {
  int version;
  const char* level;       // the ISA level it was built for: "avx512bf16", "avx512", "avx2", "default", "custom"
  const char* capability;  // the ATen vector ISA the kernels use: "AVX512", "AVX2", "DEFAULT"
  decltype(&cpu::layer_norm_fwd) layer_norm_fwd;
  decltype(&cpu::layer_norm_bwd) layer_norm_bwd;
  decltype(&cpu::rms_norm_fwd) rms_norm_fwd;
  decltype(&cpu::rms_norm_bwd) rms_norm_bwd;
  decltype(&cpu::softmax_fwd) softmax_fwd;
  decltype(&cpu::softmax_bwd) softmax_bwd;
  decltype(&cpu::attention_fwd) attention_fwd;
  decltype(&cpu::attention_bwd) attention_bwd;
  decltype(&cpu::bf16_attention_unit) bf16_attention_unit;
};

}  // namespace lmfast::cpu

// The one symbol a kernel library exports.
extern "C" const lmfast::cpu::KernelTable* lmfast_cpu_kernel_table();
