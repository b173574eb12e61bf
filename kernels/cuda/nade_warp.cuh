// The per-warp pieces of NADE's CUDA kernels: a sample's H running pre-activations spread over the
// lanes of one warp (unit lane + 32 i in slot i of kPerLane), and the step operations on them.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/nade.h"
#include "warp_sum.cuh"

namespace genfast {

constexpr int kNadeWarpsPerBlock = 4;

__device__ __forceinline__ int64_t nade_warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kNadeWarpsPerBlock + threadIdx.x / 32;
}

template <int kPerLane>
struct NadeWarpState {
  float a[kPerLane];

  __device__ __forceinline__ void load(const float* __restrict__ src, int64_t hidden, int lane) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t h = lane + 32 * i;
      a[i] = h < hidden ? __ldg(src + h) : 0.0f;
    }
  }

  // row . act(a) over the warp.
  __device__ __forceinline__ float activated_dot(NadeActivation act, const float* __restrict__ row, int64_t hidden,
                                                 int lane) const {
    float partial = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t h = lane + 32 * i;
      if (h < hidden) partial += __ldg(row + h) * nade_activation(act, a[i]);
    }
    return warp_sum(partial);
  }

  __device__ __forceinline__ void add_scaled(const float* __restrict__ row, float scale, int64_t hidden, int lane) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t h = lane + 32 * i;
      if (h < hidden) a[i] += scale * __ldg(row + h);
    }
  }
};

// Runs kernel<kPerLane> for the smallest register layout that holds `hidden` units.
template <template <int> class Launch, typename... Args>
cudaError_t launch_for_hidden(int64_t hidden, Args&&... args) {
  if (hidden <= 8 * 32) return Launch<8>::run(args...);
  if (hidden <= 32 * 32) return Launch<32>::run(args...);
  return cudaErrorInvalidValue;
}

inline unsigned nade_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kNadeWarpsPerBlock - 1) / kNadeWarpsPerBlock);
}

}  // namespace genfast
