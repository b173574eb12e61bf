// A float sum in a fixed order that still vectorizes: 16 interleaved partial sums, the same on
// every instruction set (g++ may not reorder a plain float sum, and `omp simd reduction` keeps
// loops calling the shared maths from vectorizing).
#pragma once

#include <stdint.h>

namespace genfast {

constexpr int kSumLanes = 16;

inline float ordered_sum(const float* __restrict v, int64_t n) {
  float lanes[kSumLanes] = {};
  int64_t k = 0;
  for (; k + kSumLanes <= n; k += kSumLanes) {
    for (int j = 0; j < kSumLanes; ++j) lanes[j] += v[k + j];
  }
  for (int j = 0; k + j < n; ++j) lanes[j] += v[k + j];
  float sum = 0.0f;
  for (int j = 0; j < kSumLanes; ++j) sum += lanes[j];
  return sum;
}

}  // namespace genfast
