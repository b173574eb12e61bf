// genfast::denoise_step on the CPU: blocks of elements, parallel over blocks, vectorized inside.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../denoise_step_args.h"
#include "cpu_features.h"
#include "philox_block.h"
#include "streaming_store.h"

namespace genfast {
namespace {

constexpr int64_t kBlock = 1024;  // elements; a multiple of 4 * kPhiloxLanes
static_assert(kBlock % (4 * kPhiloxLanes) == 0, "a block must hold whole Philox batches");

struct BlockInputs {
  const float* x;
  const float* m;
  const float* m_cond;  // nullable
  const float* z;
  const float* d;
  float* out;
  float* x0;
};

// Loops below carry `ivdep`: out may be the sample itself (an in-place step), which is safe since
// every iteration reads its own element before writing it, but defeats the compiler's alias check.
GF_CPU_CLONES void guide_block(const float* m, const float* m_cond, float scale, float* guided, int64_t n) {
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) guided[j] = guided_output(m[j], m_cond[j], scale);
}

GF_CPU_CLONES void denoise_block(const float* coefs, float lo, float hi, const float* x, const float* m,
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

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

template <typename T>
void denoise_step_cpu_typed(const DenoiseStepParams<T>& p) {
  constexpr bool kIsFloat = std::is_same<T, float>::value;
  const int64_t num_blocks = (p.numel + kBlock - 1) / kBlock;
  const float lo = p.clip ? p.clip_lo : -std::numeric_limits<float>::infinity();
  const float hi = p.clip ? p.clip_hi : std::numeric_limits<float>::infinity();
  const bool streaming = kIsFloat && p.numel * static_cast<int64_t>(sizeof(float)) >= kStreamingStoreMinBytes;
  at::parallel_for(0, num_blocks, /*grain_size=*/16, [&](int64_t first, int64_t last) {
    alignas(64) float zeros[kBlock] = {};
    alignas(64) float z[kBlock], x0_scratch[kBlock], guided[kBlock];
    alignas(64) float x[kBlock], m[kBlock], m_cond[kBlock], d[kBlock], out[kBlock];
    for (int64_t block = first; block < last; ++block) {
      const int64_t i0 = block * kBlock;
      const int64_t n = std::min(kBlock, p.numel - i0);
      auto input = [&](const T* src, float* buffer) -> const float* {
        if (src == nullptr) return nullptr;
        if constexpr (kIsFloat) return src + i0;
        to_float(src + i0, buffer, n);
        return buffer;
      };
      BlockInputs b;
      b.x = input(p.sample, x);
      b.m = input(p.model_output, m);
      b.m_cond = input(p.model_output_cond, m_cond);
      b.d = p.derivative != nullptr ? input(p.derivative, d) : zeros;
      if (p.noise_source == NoiseSource::kPhilox) {
        philox_normals(p.philox.seed, p.philox.offset, static_cast<uint64_t>(i0 / 4), (n + 3) / 4, z);
        b.z = z;
      } else if (p.noise_source == NoiseSource::kTensor) {
        b.z = input(p.noise, z);
      } else {
        b.z = zeros;
      }
      float* out_block = out;
      float* x0_block = x0_scratch;
      if constexpr (kIsFloat) {
        if (!streaming) {
          out_block = p.out + i0;
          if (p.pred_original != nullptr) x0_block = p.pred_original + i0;
        }
      }

      // A block may straddle samples with different coefficients: split it at row boundaries.
      for (int64_t s = 0; s < n;) {
        const int64_t row = (i0 + s) / p.row_size;
        const int64_t e = std::min(n, (row + 1) * p.row_size - i0);
        const float* c = p.row_coefs != nullptr ? p.row_coefs + row * kNumDenoiseCoefs : p.coefs.v;
        const float* m_used = b.m + s;
        if (b.m_cond != nullptr) {
          guide_block(b.m + s, b.m_cond + s, c[kGuidanceScale], guided + s, e - s);
          m_used = guided + s;
        }
        denoise_block(c, lo, hi, b.x + s, m_used, b.z + s, b.d + s, out_block + s, x0_block + s, e - s);
        s = e;
      }
      if constexpr (kIsFloat) {
        if (streaming) {
          streaming_store(p.out + i0, out_block, n);
          if (p.pred_original != nullptr) streaming_store(p.pred_original + i0, x0_block, n);
        }
      } else {
        from_float(out_block, p.out + i0, n);
        if (p.pred_original != nullptr) from_float(x0_block, p.pred_original + i0, n);
      }
    }
    if (streaming) streaming_store_fence();
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
  switch (sample.scalar_type()) {
    case at::kFloat:
      denoise_step_cpu_typed(denoise_step_params<float, float>(t, clip, clip_lo, clip_hi, seed, offset));
      break;
    case at::kHalf:
      denoise_step_cpu_typed(denoise_step_params<at::Half, at::Half>(t, clip, clip_lo, clip_hi, seed, offset));
      break;
    default:
      denoise_step_cpu_typed(
          denoise_step_params<at::BFloat16, at::BFloat16>(t, clip, clip_lo, clip_hi, seed, offset));
      break;
  }
  finish_denoise_step(t, out, pred_original);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("denoise_step", &denoise_step_cpu); }

}  // namespace genfast
