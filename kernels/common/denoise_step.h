// The fused diffusion denoise step, as one formula over per-sample coefficients.
//
// Every supported sampler (DDPM, DDIM, Euler, flow-matching Euler and Heun) is, per sample, an
// affine map of the sample x, the (optionally guided) model output m, a standard normal z and,
// for Heun's second stage, the first-stage derivative d, with one optional clamp of the
// predicted original sample in the middle:
//
//   m  = m_uncond + g * (m_cond - m_uncond)                  (classifier-free guidance, optional)
//   x0 = clamp(a_x * x + a_m * m + a_z * z, lo, hi)          (clamp optional)
//   out = o_0 * x0 + o_x * x + o_m * m + o_z * z + o_d * d
//
// genfast/diffusion.py derives the coefficients of each sampler from its schedule values.
#pragma once

#include <stdint.h>

#include "host_device.h"
#include "philox.h"

namespace genfast {

enum DenoiseCoefIndex : int {
  kGuidanceScale = 0,
  kX0FromSample,
  kX0FromModel,
  kX0FromNoise,
  kOutFromX0,
  kOutFromSample,
  kOutFromModel,
  kOutFromNoise,
  kOutFromDerivative,
  kNumDenoiseCoefs
};

struct DenoiseCoefs {
  float v[kNumDenoiseCoefs];
};

// Pointers address contiguous arrays of numel elements; the optional ones may be null.
template <typename T>
struct DenoiseStepParams {
  int64_t numel;
  int64_t row_size;  // elements per sample: row_coefs row r covers [r * row_size, (r + 1) * row_size)
  const T* sample;
  const T* model_output;       // unconditional output when model_output_cond is set
  const T* model_output_cond;  // nullable
  const T* derivative;         // nullable
  const T* noise;              // used when noise_source == kTensor
  T* out;
  T* pred_original;            // nullable
  const float* row_coefs;      // nullable: rows x kNumDenoiseCoefs, else `coefs` for every element
  DenoiseCoefs coefs;
  NoiseSource noise_source;
  bool clip;
  float clip_lo, clip_hi;
  PhiloxKeyRef philox;  // used when noise_source == kPhilox
};

// Comparisons are false for NaN, so NaN passes through (fminf/fmaxf would replace it).
GF_HOST_DEVICE float clamp_keep_nan(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

GF_HOST_DEVICE float guided_output(float uncond, float cond, float scale) {
  return uncond + scale * (cond - uncond);
}

GF_HOST_DEVICE float predicted_original(const float* c, bool clip, float lo, float hi, float x, float m, float z) {
  const float x0 = c[kX0FromSample] * x + c[kX0FromModel] * m + c[kX0FromNoise] * z;
  return clip ? clamp_keep_nan(x0, lo, hi) : x0;
}

GF_HOST_DEVICE float denoised(const float* c, float x0, float x, float m, float z, float d) {
  return c[kOutFromX0] * x0 + c[kOutFromSample] * x + c[kOutFromModel] * m + c[kOutFromNoise] * z +
         c[kOutFromDerivative] * d;
}

}  // namespace genfast
