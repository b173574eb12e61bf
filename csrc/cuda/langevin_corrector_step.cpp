// genfast::langevin_corrector_step on CUDA: the noise norms (the noise drawn, not stored), the
// step sizes (device tensors, no sync), then the Langevin step drawing the same noise.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "launch.h"

#include "../../kernels/cuda/noise_norms.cuh"
#include "../langevin_corrector_args.h"
#include "langevin_step.h"
#include "philox_key.h"

namespace genfast {
namespace {

void langevin_corrector_step_cuda(const at::Tensor& x, const at::Tensor& score,
                                  const std::optional<at::Tensor>& noise, const at::Tensor& alpha, double snr,
                                  bool per_sample_norms, bool philox_noise,
                                  const std::optional<at::Generator>& generator, int64_t seed, int64_t offset,
                                  const at::Tensor& out, const std::optional<at::Tensor>& mean_out) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_langevin_corrector(x, score, noise, alpha, snr);
  if (x.numel() == 0) return;
  // One key for both passes, so that the update draws the noise whose norms set its step.
  const std::optional<PhiloxKeyRef> key =
      cuda_philox_key(kLangevinCorrectorOp, !noise.has_value(), generator, x.device());
  const PhiloxKeyRef philox =
      key ? *key : PhiloxKeyRef{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), nullptr, nullptr};
  const at::Tensor squares = corrector_noise_squares(x, noise, philox_noise, philox, [](const NoiseNormsParams& p) {
    check_grid_y(kLangevinCorrectorOp, "a sample's element count", p.row_size, p.chunk_size);
    const cudaError_t status = launch_noise_norms(p, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == cudaSuccess, kLangevinCorrectorOp, ": CUDA launch failed: ", cudaGetErrorString(status));
  });
  const at::Tensor row_coefs = langevin_corrector_row_coefs(x, score, squares, alpha, snr, per_sample_norms);
  const double inf = std::numeric_limits<double>::infinity();
  langevin_step_cuda_keyed(x, score, noise, row_coefs, {0.0, 0.0, 0.0, 0.0}, inf, -inf, inf, !noise.has_value(), key,
                           seed, offset, out, mean_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) { m.impl("langevin_corrector_step", &langevin_corrector_step_cuda); }

}  // namespace genfast
