// The exported kernel table of this ISA level's library (see kernel_table.h).
#include "vec.h"  // first: selects the vector ISA (CPU_CAPABILITY)

#include "kernel_table.h"

#ifndef LMFAST_ISA_LEVEL  // set by lmfast/_build_flags.py, unquoted
#define LMFAST_ISA_LEVEL custom
#endif
#define LMFAST_STR2(x) #x
#define LMFAST_STR(x) LMFAST_STR2(x)

extern "C" __attribute__((visibility("default"))) const lmfast::cpu::KernelTable*
lmfast_cpu_kernel_table() {
  namespace k = lmfast::cpu;
  static const k::KernelTable table{
      k::kKernelTableVersion, LMFAST_STR(LMFAST_ISA_LEVEL), LMFAST_STR(CPU_CAPABILITY),
      &k::layer_norm_fwd,     &k::layer_norm_bwd,           &k::rms_norm_fwd,
      &k::rms_norm_bwd,       &k::softmax_fwd,              &k::softmax_bwd,
      &k::attention_fwd,      &k::attention_bwd,            &k::bf16_attention_unit,
  };
  return &table;
}
