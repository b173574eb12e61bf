// float16 and bfloat16 rows widened to float32 buffers and narrowed back, sixteen elements at a time
// in vector registers (the compiler vectorizes neither c10::Half's nor c10::BFloat16's conversions),
// rounding to nearest even. Inlined into functions compiled per instruction set (cpu_features.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdint.h>

#include <type_traits>

#include "cpu_features.h"
#include "cpu_vectors.h"

namespace genfast {
namespace {

// n elements as float32 and back.
template <CpuCapability isa, typename T>
GF_CPU_INLINE void widen(const T* src, float* dst, int64_t n) {
  constexpr int W = kVectorLanes<isa>;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  int64_t j = 0;
  for (; j + kCols <= n; j += kCols) {
    store16(dst + j, std::is_same_v<T, c10::Half> ? load16_float16<W>(bits + j) : load16_bfloat16<W>(bits + j));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <CpuCapability isa, typename T>
GF_CPU_INLINE void narrow(const float* src, T* dst, int64_t n) {
  constexpr int W = kVectorLanes<isa>;
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
  int64_t j = 0;
  for (; j + kCols <= n; j += kCols) {
    if constexpr (std::is_same_v<T, c10::Half>) {
      store16_float16<W>(bits + j, load16<W>(src + j));
    } else {
      store16_bfloat16<W>(bits + j, load16<W>(src + j));
    }
  }
  for (; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

}  // namespace
}  // namespace genfast
