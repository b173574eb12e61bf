// Argument checks and preparation shared by the CPU and CUDA bindings of genfast::denoise_step.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "../kernels/common/denoise_step.h"

namespace genfast {

struct DenoiseStepTensors {
  at::Tensor sample, model_output, model_output_cond, derivative, noise, row_coefs, out, pred_original;
  DenoiseCoefs coefs;
  NoiseSource noise_source;
  int64_t row_size;
};

inline void check_like_sample(const at::Tensor& sample, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.sizes() == sample.sizes(), "genfast.denoise_step: ", name, " must have the shape of sample ",
              sample.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == sample.scalar_type(), "genfast.denoise_step: ", name,
              " must have the dtype of sample (", sample.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == sample.device(), "genfast.denoise_step: ", name, " must be on the device of sample (",
              sample.device(), "), got ", t.device());
}

inline at::Tensor contiguous_if(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

inline DenoiseStepTensors prepare_denoise_step(
    const at::Tensor& sample, const at::Tensor& model_output, const std::optional<at::Tensor>& model_output_cond,
    const std::optional<at::Tensor>& derivative, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& row_coefs, at::ArrayRef<double> coefs, bool philox_noise,
    const at::Tensor& out, const std::optional<at::Tensor>& pred_original) {
  const auto dtype = sample.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "genfast.denoise_step: sample must be float32, float16 or bfloat16, got ", dtype);
  check_like_sample(sample, model_output, "model_output");
  if (model_output_cond) check_like_sample(sample, *model_output_cond, "model_output_cond");
  if (derivative) check_like_sample(sample, *derivative, "derivative");
  if (noise) check_like_sample(sample, *noise, "noise");
  check_like_sample(sample, out, "out");
  if (pred_original) check_like_sample(sample, *pred_original, "pred_original");
  TORCH_CHECK(coefs.size() == kNumDenoiseCoefs, "genfast.denoise_step: coefs must hold ", kNumDenoiseCoefs,
              " values, got ", coefs.size());

  DenoiseStepTensors t;
  const int64_t numel = sample.numel();
  t.row_size = numel;
  if (row_coefs) {
    const auto& rc = *row_coefs;
    TORCH_CHECK(rc.dim() == 2 && rc.size(1) == kNumDenoiseCoefs, "genfast.denoise_step: row_coefs must have shape (rows, ",
                kNumDenoiseCoefs, "), got ", rc.sizes());
    TORCH_CHECK(rc.scalar_type() == at::kFloat, "genfast.denoise_step: row_coefs must be float32, got ", rc.scalar_type());
    TORCH_CHECK(rc.device() == sample.device(), "genfast.denoise_step: row_coefs must be on the device of sample (",
                sample.device(), "), got ", rc.device());
    const int64_t rows = rc.size(0);
    TORCH_CHECK(rows >= 1 && (numel == 0 || (numel % rows == 0 && sample.dim() > 0 && sample.size(0) % rows == 0)),
                "genfast.denoise_step: row_coefs must have one row or one per sample (sample.shape[0] = ",
                sample.dim() > 0 ? sample.size(0) : 0, "), got ", rows);
    t.row_size = numel == 0 ? 1 : numel / rows;
    t.row_coefs = rc.contiguous();
  }
  for (int j = 0; j < kNumDenoiseCoefs; ++j) t.coefs.v[j] = static_cast<float>(coefs[j]);

  t.sample = sample.contiguous();
  t.model_output = model_output.contiguous();
  t.model_output_cond = contiguous_if(model_output_cond);
  t.derivative = contiguous_if(derivative);
  t.noise = contiguous_if(noise);
  t.noise_source = noise ? NoiseSource::kTensor : (philox_noise ? NoiseSource::kPhilox : NoiseSource::kNone);
  // Results go straight into out when it is contiguous; otherwise into a buffer copied back after.
  t.out = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  if (pred_original) {
    t.pred_original = pred_original->is_contiguous() ? *pred_original
                                                     : at::empty_like(*pred_original, at::MemoryFormat::Contiguous);
  }
  return t;
}

inline void finish_denoise_step(const DenoiseStepTensors& t, const at::Tensor& out,
                                const std::optional<at::Tensor>& pred_original) {
  if (!t.out.is_same(out)) out.copy_(t.out);
  if (pred_original && !t.pred_original.is_same(*pred_original)) pred_original->copy_(t.pred_original);
}

template <typename T, typename Storage>
DenoiseStepParams<T> denoise_step_params(const DenoiseStepTensors& t, bool clip, double clip_lo, double clip_hi,
                                         int64_t seed, int64_t offset) {
  auto ptr = [](const at::Tensor& x) -> const T* {
    return x.defined() ? reinterpret_cast<const T*>(x.const_data_ptr<Storage>()) : nullptr;
  };
  auto mut = [](const at::Tensor& x) -> T* {
    return x.defined() ? reinterpret_cast<T*>(x.mutable_data_ptr<Storage>()) : nullptr;
  };
  DenoiseStepParams<T> p;
  p.numel = t.sample.numel();
  p.row_size = t.row_size;
  p.sample = ptr(t.sample);
  p.model_output = ptr(t.model_output);
  p.model_output_cond = ptr(t.model_output_cond);
  p.derivative = ptr(t.derivative);
  p.noise = ptr(t.noise);
  p.out = mut(t.out);
  p.pred_original = mut(t.pred_original);
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
