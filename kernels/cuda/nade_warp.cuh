// The per-warp pieces of NADE's CUDA kernels: a sample's H running pre-activations spread over the
// lanes of one warp (unit lane + 32 i in slot i of kPerLane), and the step operations on them.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/nade.h"
#include "float_conversion.cuh"
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

// Whether every step of `row` visits a dimension in [0, dims), asked of the whole warp. The CPU
// binding checks that each ordering is a permutation; a GPU does not (that would synchronise), and
// its kernels give a row whose ordering leaves the range NaN (and no gradient) instead of reading and
// writing past the parameters and the row.
__device__ __forceinline__ bool nade_warp_ordering_in_range(const int64_t* ordering, bool per_row, int64_t row,
                                                            int64_t dims, int lane) {
  if (ordering == nullptr) return true;
  bool outside = false;
  for (int64_t k = lane; k < dims; k += 32) {
    const int64_t d = nade_step_dim(ordering, per_row, row, dims, k);
    outside |= d < 0 || d >= dims;
  }
  return !__any_sync(0xffffffffu, outside);
}

// Writes NaN to the D elements of a row (lanes in turn).
template <typename T>
__device__ __forceinline__ void nade_warp_fill_nan(T* row_start, int64_t dims, int lane) {
  for (int64_t k = lane; k < dims; k += 32) row_start[k] = from_float<T>(__int_as_float(0x7fc00000));
}

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
