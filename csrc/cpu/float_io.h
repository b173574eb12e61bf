// Conversions between a tensor's element type and the float32 that the CPU kernels compute in.
#pragma once

#include <stdint.h>

namespace genfast {

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

}  // namespace genfast
