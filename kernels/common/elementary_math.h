// exp, log, log1p, tanh and atan in float32 for every backend. nvcc uses CUDA's accurate library
// functions; g++ gets Cephes' polynomials written branch-free (selects only), so that loops calling
// them vectorize. Each propagates NaN and handles 0, infinities and denormals like libm (to within
// a few ulp); kernels/tests/test_common_math.cpp checks them against libm.
#pragma once

#include <stdint.h>

#include "host_device.h"
#include "normal_math.h"  // float_bits, bits_float, log_positive

namespace genfast {

GF_HOST_DEVICE_INLINE float abs_f32(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);
#else
  return __builtin_fabsf(x);
#endif
}

// x = n ln 2 + r with |r| <= ln(2) / 2 (ln 2 in two parts); returns e^r (Cephes' polynomial) and n.
GF_HOST_DEVICE_INLINE float exp_reduced(float x, float* n_out) {
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  *n_out = n;
  return p * (r * r) + r + 1.0f;
}

GF_HOST_DEVICE_INLINE float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  float n;
  const float e = exp_reduced(x, &n);
  // 2^n in two factors, so that results down to the denormals come out right.
  const float n_clamped = x < -127.0f ? -150.0f : (x > 128.0f ? 129.0f : n);
  const int32_t k = static_cast<int32_t>(n_clamped == n_clamped ? n_clamped : 0.0f);
  const int32_t k1 = k / 2, k2 = k - k1;
  const float scaled = e * bits_float(static_cast<uint32_t>(k1 + 127) << 23) *
                       bits_float(static_cast<uint32_t>(k2 + 127) << 23);
  const float result = x > 88.72283905206835f ? __builtin_inff() : (x < -103.97208f ? 0.0f : scaled);
  return x != x ? x : result;
#endif
}

// e^x for x <= 0 (softmax's shifted scores, a sigmoid's e^-|a|): one 2^n factor, 0 where n =
// floor(x log2 e + 1/2) <= -127 (x < -87.68), an absolute error under 1.2e-38 down to there
// (subnormal results from x < -87.34); within 2 ulp otherwise; NaN propagates.
GF_HOST_DEVICE_INLINE float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  float n;
  const float reduced = exp_reduced(x, &n);
  const float n_kept = n > -127.0f ? n : -127.0f;  // NaN too; 2^-127 is built as 0
  const float power = bits_float(static_cast<uint32_t>(static_cast<int32_t>(n_kept) + 127) << 23);
  const float e = x < -104.0f ? 0.0f : reduced * power;  // also x = -inf, where the reduction is NaN
  return x != x ? x : e;
#endif
}

GF_HOST_DEVICE_INLINE float log_f32(float v) {
#if defined(__CUDA_ARCH__)
  return logf(v);
#else
  const bool denormal = v < 1.17549435e-38f;
  const float normal = denormal ? v * 8388608.0f : v;  // 2^23
  float r = log_positive(normal) - (denormal ? 15.942385152878742f : 0.0f);  // 23 log 2
  r = v == 0.0f ? -__builtin_inff() : r;
  r = v < 0.0f ? __builtin_nanf("") : r;
  r = v == __builtin_inff() ? v : r;
  return v != v ? v : r;
#endif
}

// log(1 + z) for z >= -1, accurate for tiny z (Goldberg's correction of the rounding in 1 + z).
GF_HOST_DEVICE_INLINE float log1p_f32(float z) {
#if defined(__CUDA_ARCH__)
  return log1pf(z);
#else
  const float w = 1.0f + z;
  const float corrected = log_f32(w) * (z / (w - 1.0f));
  const float r = w == 1.0f ? z : corrected;
  return w == __builtin_inff() ? w : r;
#endif
}

GF_HOST_DEVICE_INLINE float tanh_f32(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  const float a = __builtin_fabsf(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float large = 1.0f - 2.0f / (exp_f32(a + a) + 1.0f);
  return a >= 0.625f ? (x < 0.0f ? -large : large) : small;
#endif
}

GF_HOST_DEVICE_INLINE float atan_f32(float x) {
#if defined(__CUDA_ARCH__)
  return atanf(x);
#else
  const float a = __builtin_fabsf(x);
  const bool big = a > 2.414213562373095f, mid = a > 0.4142135623730950f;
  const float r = big ? -1.0f / a : (mid ? (a - 1.0f) / (a + 1.0f) : a);
  const float base = big ? 1.5707963267948966f : (mid ? 0.7853981633974483f : 0.0f);
  const float z = r * r;
  float p = 8.05374449538e-2f;
  p = p * z - 1.38776856032e-1f;
  p = p * z + 1.99777106478e-1f;
  p = p * z - 3.33329491539e-1f;
  const float y = base + (p * z * r + r);
  return x < 0.0f ? -y : (x != x ? x : y);
#endif
}

GF_HOST_DEVICE_INLINE float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// log(1 + e^x) without overflow; NaN in, NaN out.
GF_HOST_DEVICE_INLINE float softplus_f32(float x) {
  const float positive = x > 0.0f ? x : 0.0f;
  return positive + log1p_f32(exp_f32(-abs_f32(x)));
}

}  // namespace genfast
