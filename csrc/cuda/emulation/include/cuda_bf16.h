// Host emulation (csrc/cuda/emulation/include/cuda_runtime.h): __nv_bfloat16 is c10::BFloat16,
// whose conversion from float rounds to nearest even, as __float2bfloat16_rn does.
#pragma once
#include <c10/util/BFloat16.h>

#include "cuda_runtime.h"

using __nv_bfloat16 = c10::BFloat16;
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
