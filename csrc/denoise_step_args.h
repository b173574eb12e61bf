// Argument checks and preparation shared by the CPU and CUDA bindings of genfast::denoise_step.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../kernels/common/denoise_step.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kDenoiseStepOp = "genfast.denoise_step";

struct DenoiseStepTensors {
  at::Tensor sample, model_output, model_output_cond, derivative, noise, row_coefs, out, pred_original;
  DenoiseCoefs coefs;
  NoiseSource noise_source;
  int64_t row_size;
};

inline DenoiseStepTensors prepare_denoise_step(
    const at::Tensor& sample, const at::Tensor& model_output, const std::optional<at::Tensor>& model_output_cond,
    const std::optional<at::Tensor>& derivative, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& row_coefs, at::ArrayRef<double> coefs, bool philox_noise,
    const at::Tensor& out, const std::optional<at::Tensor>& pred_original) {
  const char* op = kDenoiseStepOp;
  check_floating_input(op, sample, "sample");
  check_like(op, sample, "sample", model_output, "model_output");
  if (model_output_cond) check_like(op, sample, "sample", *model_output_cond, "model_output_cond");
  if (derivative) check_like(op, sample, "sample", *derivative, "derivative");
  if (noise) check_like(op, sample, "sample", *noise, "noise");
  check_like(op, sample, "sample", out, "out");
  if (pred_original) check_like(op, sample, "sample", *pred_original, "pred_original");
  TORCH_CHECK(coefs.size() == kNumDenoiseCoefs, op, ": coefs must hold ", kNumDenoiseCoefs, " values, got ",
              coefs.size());

  DenoiseStepTensors t;
  const RowCoefficients rows = row_coefficients(op, row_coefs, sample, kNumDenoiseCoefs);
  t.row_coefs = rows.tensor;
  t.row_size = rows.row_size;
  for (int j = 0; j < kNumDenoiseCoefs; ++j) t.coefs.v[j] = static_cast<float>(coefs[j]);
  t.sample = sample.contiguous();
  t.model_output = model_output.contiguous();
  t.model_output_cond = contiguous_if(model_output_cond);
  t.derivative = contiguous_if(derivative);
  t.noise = contiguous_if(noise);
  t.noise_source = noise ? NoiseSource::kTensor : (philox_noise ? NoiseSource::kPhilox : NoiseSource::kNone);
  t.out = contiguous_output(out);
  t.pred_original = contiguous_output_if(pred_original);
  return t;
}

inline void finish_denoise_step(const DenoiseStepTensors& t, const at::Tensor& out,
                                const std::optional<at::Tensor>& pred_original) {
  copy_back_if_buffered(t.out, out);
  copy_back_if_buffered(t.pred_original, pred_original);
}

template <typename T, typename Storage>
DenoiseStepParams<T> denoise_step_params(const DenoiseStepTensors& t, bool clip, double clip_lo, double clip_hi,
                                         int64_t seed, int64_t offset) {
  DenoiseStepParams<T> p;
  p.numel = t.sample.numel();
  p.row_size = t.row_size;
  p.sample = input_ptr<T, Storage>(t.sample);
  p.model_output = input_ptr<T, Storage>(t.model_output);
  p.model_output_cond = input_ptr<T, Storage>(t.model_output_cond);
  p.derivative = input_ptr<T, Storage>(t.derivative);
  p.noise = input_ptr<T, Storage>(t.noise);
  p.out = output_ptr<T, Storage>(t.out);
  p.pred_original = output_ptr<T, Storage>(t.pred_original);
  p.row_coefs = t.row_coefs.defined() ? t.row_coefs.const_data_ptr<float>() : nullptr;
  p.coefs = t.coefs;
  p.noise_source = t.noise_source;
  p.clip = clip;
  p.clip_lo = static_cast<float>(clip_lo);
  p.clip_hi = static_cast<float>(clip_hi);
  p.philox = PhiloxKeyRef{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), nullptr, nullptr};
  return p;
}

}  // namespace genfast
