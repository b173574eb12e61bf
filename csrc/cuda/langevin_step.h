// genfast::langevin_step on CUDA with the Philox key already taken, for the CUDA ops built on it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../../kernels/common/philox.h"

namespace genfast {

// key: from a CUDA generator (see philox_key.h), else none and (seed, offset) key the noise.
void langevin_step_cuda_keyed(const at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& row_coefs, at::ArrayRef<double> coefs,
                              double grad_clip, double clamp_lo, double clamp_hi, bool philox_noise,
                              const std::optional<PhiloxKeyRef>& key, int64_t seed, int64_t offset,
                              const at::Tensor& out, const std::optional<at::Tensor>& mean_out);

}  // namespace genfast
