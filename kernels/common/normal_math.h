// Float maths for the Box-Muller transform, written branch-free so that g++ vectorizes the CPU
// loops and every backend (C++, CUDA, Triton) evaluates the same polynomials.
// log: Cephes logf; sin/cos: Cephes sinf/cosf on [-pi/4, pi/4] with an exact quadrant reduction.
#pragma once

#include <stdint.h>
#include <string.h>

#include "host_device.h"

namespace genfast {

GF_HOST_DEVICE uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  return __builtin_bit_cast(uint32_t, v);  // a memcpy here would stop g++ vectorizing the loop
#endif
}

GF_HOST_DEVICE float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);
#endif
}

// Natural log of a positive, normal float (the uniforms of Box-Muller never leave (0, 1]).
GF_HOST_DEVICE float log_positive(float v) {
  const uint32_t bits = float_bits(v);
  float exponent = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  const float mantissa = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);  // in [0.5, 1)
  const bool below_sqrt_half = mantissa < 0.70710678118654752f;
  exponent = below_sqrt_half ? exponent - 1.0f : exponent;
  const float f = below_sqrt_half ? mantissa + mantissa - 1.0f : mantissa - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = p * f * z;
  y += -2.12194440e-4f * exponent;
  y += -0.5f * z;
  return f + y + 0.693359375f * exponent;
}

// Uniform in (0, 1] from the top 24 bits of a word; never 0, so its log is finite.
GF_HOST_DEVICE float uniform_open_zero(uint32_t bits) {
  return (static_cast<float>(bits >> 8) + 0.5f) * 5.9604644775390625e-8f;  // 2^-24
}

GF_HOST_DEVICE float box_muller_radius(uint32_t bits) {
  const float log_u = log_positive(uniform_open_zero(bits));
#if defined(__CUDA_ARCH__)
  return sqrtf(-2.0f * log_u);
#else
  return __builtin_sqrtf(-2.0f * log_u);
#endif
}

// cos and sin of 2*pi*k/2^24 for k = bits >> 8. The quadrant comes from the integer, so the
// polynomial only ever sees |angle| <= pi/4.
GF_HOST_DEVICE void cos_sin_turns(uint32_t bits, float* cos_out, float* sin_out) {
  const int32_t k = static_cast<int32_t>(bits >> 8);
  const int32_t quadrant = (k + (1 << 21)) >> 22;
  const int32_t remainder = k - (quadrant << 22);                            // [-2^21, 2^21)
  const float a = static_cast<float>(remainder) * 3.7450702829239744e-07f;   // (pi/2) / 2^22
  const float z = a * a;
  const float s = a + a * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
  const float c = 1.0f - 0.5f * z +
                  z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f);
  const bool odd = (quadrant & 1) != 0;
  const float sign = (quadrant & 2) != 0 ? -1.0f : 1.0f;
  *cos_out = sign * (odd ? -s : c);
  *sin_out = sign * (odd ? c : s);
}

}  // namespace genfast
