// Host emulation (csrc/cuda/emulation/include/cuda_runtime.h): __half is c10::Half, whose
// conversions round to nearest even, as __float2half_rn does.
#pragma once
#include <c10/util/Half.h>

#include "cuda_runtime.h"

using __half = c10::Half;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
