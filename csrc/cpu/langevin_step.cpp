// genfast::langevin_step on the CPU: blocks of elements, parallel over blocks, vectorized inside.
#include <torch/library.h>

#include "langevin_step.h"

#include "../langevin_step_args.h"
#include "block_loop.h"
#include "cpu_features.h"

namespace genfast {
namespace {

// `ivdep`: out may be x itself (an in-place step); see denoise_step.cpp.
template <CpuCapability isa>
GF_CPU_INLINE void langevin_block_for(const float* coefs, float grad_clip, float lo, float hi, const float* x,
                                      const float* g, const float* z, float* out, float* mean_out, int64_t n) {
  float c[kNumLangevinCoefs];
  for (int k = 0; k < kNumLangevinCoefs; ++k) c[k] = coefs[k];
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    const float mean = langevin_mean(c, grad_clip, x[j], g[j]);
    out[j] = clamp_keep_nan(mean + c[kNoiseStd] * z[j], lo, hi);
    mean_out[j] = clamp_keep_nan(mean, lo, hi);
  }
}
GF_CPU_DISPATCH(langevin_block)

template <typename T>
void langevin_step_cpu_typed(const LangevinStepParams<T>& p, bool stream) {
  for_each_block<T>(p.numel, stream, [&](const Block<T>& block) {
    alignas(64) float x_buf[kBlock], g_buf[kBlock], z_buf[kBlock], out_buf[kBlock], mean_buf[kBlock];
    const float* x = block.input(p.x, x_buf);
    const float* g = block.input(p.grad, g_buf);
    const float* z = block_noise(block, p.noise_source, p.philox, p.noise, z_buf);
    float* out = block.output(p.out, out_buf);
    float* mean = block.output(p.mean_out, mean_buf);
    for_each_row_segment(block.begin(), block.size(), p.row_size, p.row_coefs, p.coefs.v, kNumLangevinCoefs,
                         [&](int64_t s, int64_t count, const float* c) {
                           langevin_block(c, p.grad_clip, p.clamp_lo, p.clamp_hi, x + s, g + s, z + s, out + s,
                                          mean + s, count);
                         });
    block.commit(p.out, out);
    block.commit(p.mean_out, mean);
  });
}

}  // namespace

void langevin_step_cpu(const at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& row_coefs, at::ArrayRef<double> coefs, double grad_clip,
                       double clamp_lo, double clamp_hi, bool philox_noise,
                       const std::optional<at::Generator>& generator, int64_t seed, int64_t offset,
                       const at::Tensor& out, const std::optional<at::Tensor>& mean_out) {
  TORCH_CHECK(!generator.has_value(), kLangevinStepOp,
              ": on the CPU the noise is keyed by seed and offset; pass generator=None");
  const LangevinStepTensors t =
      prepare_langevin_step(x, grad, noise, row_coefs, coefs, clamp_lo, clamp_hi, philox_noise, out, mean_out);
  const bool stream = stream_outputs({t.out, t.mean_out}, {t.x, t.grad, t.noise});
  switch (x.scalar_type()) {
    case at::kFloat:
      langevin_step_cpu_typed(langevin_step_params<float, float>(t, grad_clip, clamp_lo, clamp_hi, seed, offset),
                              stream);
      break;
    case at::kHalf:
      langevin_step_cpu_typed(
          langevin_step_params<at::Half, at::Half>(t, grad_clip, clamp_lo, clamp_hi, seed, offset), stream);
      break;
    default:
      langevin_step_cpu_typed(
          langevin_step_params<at::BFloat16, at::BFloat16>(t, grad_clip, clamp_lo, clamp_hi, seed, offset), stream);
      break;
  }
  finish_langevin_step(t, out, mean_out);
}

TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("langevin_step", &langevin_step_cpu); }

}  // namespace genfast
