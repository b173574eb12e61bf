// genfast::langevin_corrector_step on the CPU: the noise norms (the noise drawn, not stored), the
// step sizes, then the Langevin step drawing the same noise.
#include <torch/library.h>

#include <limits>

#include "../langevin_corrector_args.h"
#include "langevin_step.h"
#include "noise_norms.h"

namespace genfast {
namespace {

void langevin_corrector_step_cpu(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& noise,
                                 const at::Tensor& alpha, double snr, bool per_sample_norms, bool philox_noise,
                                 const std::optional<at::Generator>& generator, int64_t seed, int64_t offset,
                                 const at::Tensor& out, const std::optional<at::Tensor>& mean_out) {
  TORCH_CHECK(!generator.has_value(), kLangevinCorrectorOp,
              ": on the CPU the noise is keyed by seed and offset; pass generator=None");
  check_langevin_corrector(x, score, noise, alpha, snr);
  if (x.numel() == 0) return;
  const PhiloxKeyRef key{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), nullptr, nullptr};
  const at::Tensor squares = corrector_noise_squares(x, noise, philox_noise, key, noise_norms_cpu);
  const at::Tensor row_coefs = langevin_corrector_row_coefs(x, score, squares, alpha, snr, per_sample_norms);
  const double inf = std::numeric_limits<double>::infinity();
  langevin_step_cpu(x, score, noise, row_coefs, {0.0, 0.0, 0.0, 0.0}, inf, -inf, inf, !noise.has_value(),
                    std::nullopt, seed, offset, out, mean_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("langevin_corrector_step", &langevin_corrector_step_cpu); }

}  // namespace genfast
