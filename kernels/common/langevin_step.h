// The fused Langevin-type update, per element of sample r:
//
//   g    = clamp(grad, -grad_clip, grad_clip) * grad_scale[r]     (grad_clip = inf: no clip)
//   mean = x_scale[r] * x + step[r] * g
//   out  = mean + noise_std[r] * z
//   out, mean clamped to [lo, hi] when asked
//
// With x_scale = 1 it is the (unadjusted) Langevin step x + eps * grad log p + sigma * z; with
// other coefficients, the Euler-Maruyama predictors of the reverse VE and VP SDEs. grad_scale
// carries a per-sample gradient-norm clip. genfast/langevin.py derives the coefficients.
#pragma once

#include <stdint.h>

#include "denoise_step.h"  // clamp_keep_nan
#include "host_device.h"
#include "philox.h"

namespace genfast {

enum LangevinCoefIndex : int { kXScale = 0, kStepSize, kNoiseStd, kGradScale, kNumLangevinCoefs };

struct LangevinCoefs {
  float v[kNumLangevinCoefs];
};

template <typename T>
struct LangevinStepParams {
  int64_t numel;
  int64_t row_size;  // elements per sample: row_coefs row r covers [r * row_size, (r + 1) * row_size)
  const T* x;
  const T* grad;
  const T* noise;          // used when noise_source == kTensor
  T* out;
  T* mean_out;             // nullable: the update without noise
  const float* row_coefs;  // nullable: rows x kNumLangevinCoefs, else `coefs` for every element
  LangevinCoefs coefs;
  NoiseSource noise_source;
  float grad_clip;         // +inf: none
  float clamp_lo, clamp_hi;  // -inf, +inf: none
  PhiloxKeyRef philox;
};

GF_HOST_DEVICE float langevin_mean(const float* c, float grad_clip, float x, float g) {
  return c[kXScale] * x + c[kStepSize] * (clamp_keep_nan(g, -grad_clip, grad_clip) * c[kGradScale]);
}

}  // namespace genfast
