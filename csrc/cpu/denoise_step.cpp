// genfast::denoise_step on the CPU: blocks of elements, parallel over blocks, vectorized inside.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../denoise_step_args.h"
#include "block_loop.h"
#include "cpu_features.h"

namespace genfast {
namespace {

// Loops below carry `ivdep`: out may be the sample itself (an in-place step), which is safe since
// every iteration reads its own element before writing it, but defeats the compiler's alias check.
template <CpuCapability isa>
GF_CPU_INLINE void guide_block_for(const float* m, const float* m_cond, float scale, float* guided, int64_t n) {
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) guided[j] = guided_output(m[j], m_cond[j], scale);
}
GF_CPU_DISPATCH(guide_block)

template <CpuCapability isa>
GF_CPU_INLINE void denoise_block_for(const float* coefs, float lo, float hi, const float* x, const float* m,
                                     const float* z, const float* d, float* out, float* x0_out, int64_t n) {
  float c[kNumDenoiseCoefs];  // locals, so that stores to out cannot be assumed to change them
  for (int k = 0; k < kNumDenoiseCoefs; ++k) c[k] = coefs[k];
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    const float x0 = clamp_keep_nan(c[kX0FromSample] * x[j] + c[kX0FromModel] * m[j] + c[kX0FromNoise] * z[j], lo, hi);
    x0_out[j] = x0;
    out[j] = denoised(c, x0, x[j], m[j], z[j], d[j]);
  }
}
GF_CPU_DISPATCH(denoise_block)

template <typename T>
void denoise_step_cpu_typed(const DenoiseStepParams<T>& p, bool stream) {
  const float lo = p.clip ? p.clip_lo : -std::numeric_limits<float>::infinity();
  const float hi = p.clip ? p.clip_hi : std::numeric_limits<float>::infinity();
  for_each_block<T>(p.numel, stream, [&](const Block<T>& block) {
    alignas(64) float z_buf[kBlock], x0_scratch[kBlock], guided[kBlock];
    alignas(64) float x_buf[kBlock], m_buf[kBlock], m_cond_buf[kBlock], d_buf[kBlock], out_buf[kBlock];
    const float* x = block.input(p.sample, x_buf);
    const float* m = block.input(p.model_output, m_buf);
    const float* m_cond = block.input(p.model_output_cond, m_cond_buf);
    const float* d = p.derivative != nullptr ? block.input(p.derivative, d_buf) : kZeroBlock;
    const float* z = block_noise(block, p.noise_source, p.philox, p.noise, z_buf);
    float* out = block.output(p.out, out_buf);
    float* x0 = block.output(p.pred_original, x0_scratch);
    for_each_row_segment(block.begin(), block.size(), p.row_size, p.row_coefs, p.coefs.v, kNumDenoiseCoefs,
                         [&](int64_t s, int64_t count, const float* c) {
                           const float* m_used = m + s;
                           if (m_cond != nullptr) {
                             guide_block(m + s, m_cond + s, c[kGuidanceScale], guided + s, count);
                             m_used = guided + s;
                           }
                           denoise_block(c, lo, hi, x + s, m_used, z + s, d + s, out + s, x0 + s, count);
                         });
    block.commit(p.out, out);
    block.commit(p.pred_original, x0);
  });
}

void denoise_step_cpu(const at::Tensor& sample, const at::Tensor& model_output,
                      const std::optional<at::Tensor>& model_output_cond, const std::optional<at::Tensor>& derivative,
                      const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_coefs,
                      at::ArrayRef<double> coefs, bool clip, double clip_lo, double clip_hi, bool philox_noise,
                      const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const at::Tensor& out,
                      const std::optional<at::Tensor>& pred_original) {
  TORCH_CHECK(!generator.has_value(),
              "genfast.denoise_step: on the CPU the noise is keyed by seed and offset; pass generator=None");
  const DenoiseStepTensors t = prepare_denoise_step(sample, model_output, model_output_cond, derivative, noise,
                                                    row_coefs, coefs, philox_noise, out, pred_original);
  const bool stream = stream_outputs({t.out, t.pred_original},
                                     {t.sample, t.model_output, t.model_output_cond, t.derivative, t.noise});
  switch (sample.scalar_type()) {
    case at::kFloat:
      denoise_step_cpu_typed(denoise_step_params<float, float>(t, clip, clip_lo, clip_hi, seed, offset), stream);
      break;
    case at::kHalf:
      denoise_step_cpu_typed(denoise_step_params<at::Half, at::Half>(t, clip, clip_lo, clip_hi, seed, offset), stream);
      break;
    default:
      denoise_step_cpu_typed(
          denoise_step_params<at::BFloat16, at::BFloat16>(t, clip, clip_lo, clip_hi, seed, offset), stream);
      break;
  }
  finish_denoise_step(t, out, pred_original);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("denoise_step", &denoise_step_cpu); }

}  // namespace genfast
