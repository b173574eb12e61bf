#include "../common/philox.h"
#include "denoise_step.cuh"
#include "vector_access.cuh"

namespace genfast {
namespace {

// One thread handles groups of four elements, which share one Philox call.
template <typename T, bool kPhilox>
__global__ void denoise_step_kernel(DenoiseStepParams<T> p, bool vector_ok) {
  const int64_t num_groups = (p.numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint64_t seed = 0, offset = 0;
  if (kPhilox) resolve_philox_key(p.philox, &seed, &offset);
  for (int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; group < num_groups;
       group += stride) {
    const int64_t i = group * 4;
    const int count = p.numel - i < 4 ? static_cast<int>(p.numel - i) : 4;
    auto load = [&](const T* base, float out[4]) { load_group(base, i, count, vector_ok, out); };

    float c[4][kNumDenoiseCoefs];
    load_coefs4<kNumDenoiseCoefs>(p.row_coefs, p.coefs.v, i, count, p.row_size, c);

    float x[4], m[4], z[4] = {0.f, 0.f, 0.f, 0.f}, d[4] = {0.f, 0.f, 0.f, 0.f};
    load(p.sample, x);
    load(p.model_output, m);
    if (p.model_output_cond != nullptr) {
      float mc[4];
      load(p.model_output_cond, mc);
#pragma unroll
      for (int j = 0; j < 4; ++j) m[j] = guided_output(m[j], mc[j], c[j][kGuidanceScale]);
    }
    if (kPhilox) {
      const Float4x32 n = philox_normal4(seed, offset, static_cast<uint64_t>(group));
      z[0] = n.x; z[1] = n.y; z[2] = n.z; z[3] = n.w;
    } else if (p.noise_source == NoiseSource::kTensor) {
      load(p.noise, z);
    }
    if (p.derivative != nullptr) load(p.derivative, d);

    float out[4], x0[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      x0[j] = predicted_original(c[j], p.clip, p.clip_lo, p.clip_hi, x[j], m[j], z[j]);
      out[j] = denoised(c[j], x0[j], x[j], m[j], z[j], d[j]);
    }
    store_group(p.out, i, count, vector_ok, out);
    if (p.pred_original != nullptr) {
      store_group(p.pred_original, i, count, vector_ok, x0);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_denoise_step(const DenoiseStepParams<T>& p, cudaStream_t stream) {
  const bool vector_ok = aligned4(p.sample) && aligned4(p.model_output) && aligned4(p.model_output_cond) &&
                         aligned4(p.derivative) && aligned4(p.noise) && aligned4(p.out) &&
                         aligned4(p.pred_original);
  return launch_elementwise(denoise_step_kernel<T, true>, denoise_step_kernel<T, false>, p, p.numel,
                            p.noise_source == NoiseSource::kPhilox, vector_ok, stream);
}

template cudaError_t launch_denoise_step<float>(const DenoiseStepParams<float>&, cudaStream_t);
template cudaError_t launch_denoise_step<__half>(const DenoiseStepParams<__half>&, cudaStream_t);
template cudaError_t launch_denoise_step<__nv_bfloat16>(const DenoiseStepParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace genfast
