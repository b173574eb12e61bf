// ActNorm (Glow): a per-channel affine map of x seen as (B, C, S), S the spatial size (1 for
// (B, C) inputs), with s = exp(log_scale):
//
//   forward:  y = x * s + b           (affine order: nflows)
//             y = (x + b) * s         (glow order: Glow, FrEIA)
//   inverse:  x = (y - b) / s,  x = y / s - b
//   logdet    = +/- S * sum_c log_scale[c], the same for every sample (computed by the binding)
#pragma once

#include <stdint.h>

#include "elementary_math.h"
#include "host_device.h"

namespace genfast {

GF_HOST_DEVICE_INLINE float actnorm_value(float x, float log_scale, float bias, bool glow_order, bool inverse) {
  if (inverse) {
    const float inv = exp_f32(-log_scale);
    return glow_order ? x * inv - bias : (x - bias) * inv;
  }
  const float s = exp_f32(log_scale);
  return glow_order ? (x + bias) * s : x * s + bias;
}

struct ActNormGrads {
  float x;          // to the input
  float log_scale;  // this element's share of the gradient to log_scale (without the logdet's)
  float bias;       // its share of the gradient to the bias
};

GF_HOST_DEVICE_INLINE ActNormGrads actnorm_grads(float x, float g, float log_scale, float bias, bool glow_order,
                                          bool inverse) {
  ActNormGrads r;
  if (!inverse) {
    const float s = exp_f32(log_scale);
    r.x = g * s;
    r.log_scale = g * (glow_order ? x + bias : x) * s;
    r.bias = glow_order ? g * s : g;
  } else {
    const float inv = exp_f32(-log_scale);
    r.x = g * inv;
    r.log_scale = -g * (glow_order ? x : x - bias) * inv;
    r.bias = glow_order ? -g : -g * inv;
  }
  return r;
}

template <typename T>
struct ActNormParams {
  int64_t rows, channels, inner;  // B, C, S; x and y contiguous (B, C, S)
  const T* x;
  const float* log_scale;  // C
  const float* bias;       // C
  T* y;
  bool glow_order, inverse;
};

// grad_x elementwise; the per-channel sums of the log_scale and bias shares over each chunk of
// rows_per_chunk samples go to partial_*[chunk * channels + c] (summed in a fixed order after).
template <typename T>
struct ActNormBackwardParams {
  int64_t rows, channels, inner;
  const T* grad_y;
  const T* x;
  const float* log_scale;
  const float* bias;
  T* grad_x;
  float* partial_log_scale;
  float* partial_bias;
  int64_t rows_per_chunk, num_chunks;
  bool glow_order, inverse;
};

}  // namespace genfast
