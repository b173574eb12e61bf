// genfast::langevin_step on the CPU, callable from the other CPU ops built on it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace genfast {

void langevin_step_cpu(const at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& row_coefs, at::ArrayRef<double> coefs, double grad_clip,
                       double clamp_lo, double clamp_hi, bool philox_noise,
                       const std::optional<at::Generator>& generator, int64_t seed, int64_t offset,
                       const at::Tensor& out, const std::optional<at::Tensor>& mean_out);

}  // namespace genfast
