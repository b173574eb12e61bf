#include "../common/philox.h"
#include "langevin_step.cuh"
#include "vector_access.cuh"

namespace genfast {
namespace {

template <typename T, bool kPhilox>
__global__ void langevin_step_kernel(LangevinStepParams<T> p, bool vector_ok) {
  const int64_t num_groups = (p.numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint64_t seed = 0, offset = 0;
  if (kPhilox) resolve_philox_key(p.philox, &seed, &offset);
  for (int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; group < num_groups;
       group += stride) {
    const int64_t i = group * 4;
    const int count = p.numel - i < 4 ? static_cast<int>(p.numel - i) : 4;
    float c[4][kNumLangevinCoefs];
    load_coefs4<kNumLangevinCoefs>(p.row_coefs, p.coefs.v, i, count, p.row_size, c);
    float x[4], g[4], z[4] = {0.f, 0.f, 0.f, 0.f};
    load_group(p.x, i, count, vector_ok, x);
    load_group(p.grad, i, count, vector_ok, g);
    if (kPhilox) {
      const Float4x32 n = philox_normal4(seed, offset, static_cast<uint64_t>(group));
      z[0] = n.x; z[1] = n.y; z[2] = n.z; z[3] = n.w;
    } else if (p.noise_source == NoiseSource::kTensor) {
      load_group(p.noise, i, count, vector_ok, z);
    }
    float out[4], mean[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float m = langevin_mean(c[j], p.grad_clip, x[j], g[j]);
      out[j] = clamp_keep_nan(m + c[j][kNoiseStd] * z[j], p.clamp_lo, p.clamp_hi);
      mean[j] = clamp_keep_nan(m, p.clamp_lo, p.clamp_hi);
    }
    store_group(p.out, i, count, vector_ok, out);
    if (p.mean_out != nullptr) {
      store_group(p.mean_out, i, count, vector_ok, mean);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_langevin_step(const LangevinStepParams<T>& p, cudaStream_t stream) {
  const bool vector_ok = aligned4(p.x) && aligned4(p.grad) && aligned4(p.noise) && aligned4(p.out) &&
                         aligned4(p.mean_out);
  return launch_elementwise(langevin_step_kernel<T, true>, langevin_step_kernel<T, false>, p, p.numel,
                            p.noise_source == NoiseSource::kPhilox, vector_ok, stream);
}

template cudaError_t launch_langevin_step<float>(const LangevinStepParams<float>&, cudaStream_t);
template cudaError_t launch_langevin_step<__half>(const LangevinStepParams<__half>&, cudaStream_t);
template cudaError_t launch_langevin_step<__nv_bfloat16>(const LangevinStepParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace genfast
