// The score-SDE Langevin corrector (score_sde's LangevinCorrector), shared by its CPU and CUDA
// bindings: per-sample step sizes eps = 2 * alpha * (snr * ||z|| / ||g||)^2 from the norms of the
// noise and of the score, then one Langevin step x + eps * g + sqrt(2 eps) * z.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../kernels/common/langevin_step.h"
#include "../kernels/common/noise_norms.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kLangevinCorrectorOp = "genfast.langevin_corrector_step";
constexpr int64_t kNoiseNormChunk = 1 << 14;

inline void check_langevin_corrector(const at::Tensor& x, const at::Tensor& score,
                                     const std::optional<at::Tensor>& noise, const at::Tensor& alpha, double snr) {
  const char* op = kLangevinCorrectorOp;
  check_floating_input(op, x, "x");
  check_like(op, x, "x", score, "score");
  if (noise) check_like(op, x, "x", *noise, "noise");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(alpha.numel() == 1 || alpha.numel() == x.size(0), op,
              ": alpha must hold one value or one per sample (x.shape[0] = ", x.size(0), "), got ", alpha.numel());
  TORCH_CHECK(alpha.device() == x.device(), op, ": alpha must be on the device of x (", x.device(), "), got ",
              alpha.device());
  TORCH_CHECK(snr >= 0, op, ": snr must be >= 0, got ", snr);
}

// A buffer for the partial sums of squares of the in-kernel noise, and its kernel parameters.
inline NoiseNormsParams noise_norms_params(const at::Tensor& x, at::Tensor& partial) {
  NoiseNormsParams p;
  p.rows = x.size(0);
  p.row_size = p.rows == 0 ? 0 : x.numel() / p.rows;
  p.chunk_size = kNoiseNormChunk;
  p.num_chunks = (p.row_size + p.chunk_size - 1) / p.chunk_size;
  partial = at::empty({p.rows, p.num_chunks}, x.options().dtype(at::kFloat));
  p.partial = partial.mutable_data_ptr<float>();
  return p;
}

// The kernel coefficients (x_scale, step, noise_std, grad_scale) of each sample.
inline at::Tensor langevin_corrector_row_coefs(const at::Tensor& x, const at::Tensor& score,
                                               const at::Tensor& noise_squares, const at::Tensor& alpha, double snr,
                                               bool per_sample_norms) {
  const int64_t rows = x.size(0);
  // float32 with torch's cascade summation: as accurate as needed, and far faster than a float64 pass
  at::Tensor grad_norm = at::linalg_vector_norm(score.reshape({rows, -1}).to(at::kFloat), 2, {1}).to(at::kDouble);
  at::Tensor noise_norm = noise_squares.to(at::kDouble).sqrt();
  if (!per_sample_norms) {  // score_sde: the batch means of the per-sample norms
    grad_norm = grad_norm.mean().expand({rows});
    noise_norm = noise_norm.mean().expand({rows});
  }
  const at::Tensor step =
      (snr * noise_norm / grad_norm).pow(2) * 2 * alpha.to(at::kDouble).reshape({-1}).expand({rows});
  const at::Tensor ones = at::ones({rows}, step.options());
  return at::stack({ones, step, (2 * step).sqrt(), ones}, 1).to(at::kFloat).contiguous();
}

// The per-sample sums of squares of the noise: of the given tensor, else of the Philox stream
// keyed by `key`, by launch_norms(params) writing the partial sums (the noise is never stored).
template <typename LaunchNorms>
at::Tensor corrector_noise_squares(const at::Tensor& x, const std::optional<at::Tensor>& noise, bool philox_noise,
                                   const PhiloxKeyRef& key, LaunchNorms launch_norms) {
  if (noise) {
    return at::linalg_vector_norm(noise->reshape({noise->size(0), -1}).to(at::kFloat), 2, {1}).to(at::kDouble).pow(2);
  }
  TORCH_CHECK(philox_noise, kLangevinCorrectorOp, ": needs noise, or philox_noise=True");
  at::Tensor partial;
  NoiseNormsParams params = noise_norms_params(x, partial);
  params.philox = key;
  launch_norms(params);
  return partial.to(at::kDouble).sum(1);
}

}  // namespace genfast
