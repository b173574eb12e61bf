// Argument checks and preparation shared by the CPU and CUDA bindings of genfast::langevin_step.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../kernels/common/langevin_step.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kLangevinStepOp = "genfast.langevin_step";

struct LangevinStepTensors {
  at::Tensor x, grad, noise, row_coefs, out, mean_out;
  LangevinCoefs coefs;
  NoiseSource noise_source;
  int64_t row_size;
};

inline LangevinStepTensors prepare_langevin_step(const at::Tensor& x, const at::Tensor& grad,
                                                 const std::optional<at::Tensor>& noise,
                                                 const std::optional<at::Tensor>& row_coefs,
                                                 at::ArrayRef<double> coefs, double clamp_lo, double clamp_hi,
                                                 bool philox_noise, const at::Tensor& out,
                                                 const std::optional<at::Tensor>& mean_out) {
  const char* op = kLangevinStepOp;
  check_floating_input(op, x, "x");
  check_like(op, x, "x", grad, "grad");
  if (noise) check_like(op, x, "x", *noise, "noise");
  check_like(op, x, "x", out, "out");
  if (mean_out) check_like(op, x, "x", *mean_out, "mean_out");
  TORCH_CHECK(coefs.size() == kNumLangevinCoefs, op, ": coefs must hold ", kNumLangevinCoefs, " values, got ",
              coefs.size());
  TORCH_CHECK(!(clamp_lo > clamp_hi), op, ": clamp_lo must be <= clamp_hi, got ", clamp_lo, " > ", clamp_hi);

  LangevinStepTensors t;
  const RowCoefficients rows = row_coefficients(op, row_coefs, x, kNumLangevinCoefs);
  t.row_coefs = rows.tensor;
  t.row_size = rows.row_size;
  for (int j = 0; j < kNumLangevinCoefs; ++j) t.coefs.v[j] = static_cast<float>(coefs[j]);
  t.x = x.contiguous();
  t.grad = grad.contiguous();
  t.noise = contiguous_if(noise);
  t.noise_source = noise ? NoiseSource::kTensor : (philox_noise ? NoiseSource::kPhilox : NoiseSource::kNone);
  t.out = contiguous_output(out);
  t.mean_out = contiguous_output_if(mean_out);
  return t;
}

inline void finish_langevin_step(const LangevinStepTensors& t, const at::Tensor& out,
                                 const std::optional<at::Tensor>& mean_out) {
  copy_back_if_buffered(t.out, out);
  copy_back_if_buffered(t.mean_out, mean_out);
}

template <typename T, typename Storage>
LangevinStepParams<T> langevin_step_params(const LangevinStepTensors& t, double grad_clip, double clamp_lo,
                                           double clamp_hi, int64_t seed, int64_t offset) {
  LangevinStepParams<T> p;
  p.numel = t.x.numel();
  p.row_size = t.row_size;
  p.x = input_ptr<T, Storage>(t.x);
  p.grad = input_ptr<T, Storage>(t.grad);
  p.noise = input_ptr<T, Storage>(t.noise);
  p.out = output_ptr<T, Storage>(t.out);
  p.mean_out = output_ptr<T, Storage>(t.mean_out);
  p.row_coefs = t.row_coefs.defined() ? t.row_coefs.const_data_ptr<float>() : nullptr;
  p.coefs = t.coefs;
  p.noise_source = t.noise_source;
  p.grad_clip = static_cast<float>(grad_clip);
  p.clamp_lo = static_cast<float>(clamp_lo);
  p.clamp_hi = static_cast<float>(clamp_hi);
  p.philox = PhiloxKeyRef{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), nullptr, nullptr};
  return p;
}

}  // namespace genfast
