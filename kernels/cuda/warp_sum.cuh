// A deterministic sum over a warp (kernels/tests/cuda_emulator.h runs it on the host).
#pragma once

#include <cuda_runtime.h>

namespace genfast {

// Sum over the warp in a fixed butterfly order; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int width = 16; width > 0; width /= 2) v += __shfl_xor_sync(0xffffffffu, v, width);
  return v;
}

}  // namespace genfast
