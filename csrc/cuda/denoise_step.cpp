// genfast::denoise_step on CUDA: checks, device guard, current stream, then kernels/cuda.
// A .cpp on purpose: only the framework-free kernels go through nvcc, which keeps builds short.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "../../kernels/cuda/denoise_step.cuh"
#include "../denoise_step_args.h"
#include "philox_key.h"

namespace genfast {
namespace {

template <typename T, typename Storage>
cudaError_t launch(const DenoiseStepTensors& t, bool clip, double clip_lo, double clip_hi,
                   const std::optional<PhiloxKeyRef>& key, int64_t seed, int64_t offset, cudaStream_t stream) {
  DenoiseStepParams<T> params = denoise_step_params<T, Storage>(t, clip, clip_lo, clip_hi, seed, offset);
  if (key) params.philox = *key;
  return launch_denoise_step(params, stream);
}

void denoise_step_cuda(const at::Tensor& sample, const at::Tensor& model_output,
                       const std::optional<at::Tensor>& model_output_cond, const std::optional<at::Tensor>& derivative,
                       const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_coefs,
                       at::ArrayRef<double> coefs, bool clip, double clip_lo, double clip_hi, bool philox_noise,
                       const std::optional<at::Generator>& generator, int64_t seed, int64_t offset,
                       const at::Tensor& out, const std::optional<at::Tensor>& pred_original) {
  const c10::cuda::CUDAGuard guard(sample.device());
  const DenoiseStepTensors t = prepare_denoise_step(sample, model_output, model_output_cond, derivative, noise,
                                                    row_coefs, coefs, philox_noise, out, pred_original);
  const std::optional<PhiloxKeyRef> key =
      cuda_philox_key(kDenoiseStepOp, t.noise_source == NoiseSource::kPhilox, generator, sample.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status;
  switch (sample.scalar_type()) {
    case at::kFloat:
      status = launch<float, float>(t, clip, clip_lo, clip_hi, key, seed, offset, stream);
      break;
    case at::kHalf:
      status = launch<__half, at::Half>(t, clip, clip_lo, clip_hi, key, seed, offset, stream);
      break;
    default:
      status = launch<__nv_bfloat16, at::BFloat16>(t, clip, clip_lo, clip_hi, key, seed, offset, stream);
      break;
  }
  TORCH_CHECK(status == cudaSuccess, "genfast.denoise_step: CUDA launch failed: ", cudaGetErrorString(status));
  finish_denoise_step(t, out, pred_original);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) { m.impl("denoise_step", &denoise_step_cuda); }

}  // namespace genfast
