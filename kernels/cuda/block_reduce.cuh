// A deterministic sum over a thread block (fixed order: warp shuffles, then the warps' sums).
#pragma once

#include <cuda_runtime.h>

namespace genfast {

// Every thread of the block must call it; thread 0 gets the sum. blockDim.x is a multiple of 32,
// at most 1024.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
#pragma unroll
  for (int width = 16; width > 0; width /= 2) v += __shfl_down_sync(0xffffffffu, v, width);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float sum = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) sum += warp_sums[w];
  }
  return sum;
}

}  // namespace genfast
