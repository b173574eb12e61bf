// float16 and bfloat16 values from their bits, exactly (zeros, subnormals, infinities, NaN), the same
// on the host and the device: for inputs read as raw 16-bit words, such as an additive attention mask.
#pragma once

#include <stdint.h>

#include "host_device.h"
#include "normal_math.h"  // float_bits, bits_float

namespace genfast {

GF_HOST_DEVICE_INLINE float float16_bits_value(uint16_t h) {
#if defined(__CUDA_ARCH__)
  float value;
  asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(h));  // one instruction, exact
  return value;
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  float magnitude;
  if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24: zero and subnormals, exact
  } else if (exponent == 31) {
    magnitude = bits_float(0x7F800000u | (mantissa << 13));  // infinity, NaN with its payload
  } else {
    magnitude = bits_float(((exponent + 112) << 23) | (mantissa << 13));  // rebias 15 -> 127
  }
  return bits_float(float_bits(magnitude) | sign);
#endif
}

GF_HOST_DEVICE_INLINE float bfloat16_bits_value(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

}  // namespace genfast
