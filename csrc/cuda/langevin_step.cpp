// genfast::langevin_step on CUDA: checks, device guard, current stream, then kernels/cuda.
// A .cpp on purpose: only the framework-free kernels go through nvcc.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "../../kernels/cuda/langevin_step.cuh"
#include "../langevin_step_args.h"
#include "langevin_step.h"
#include "philox_key.h"

namespace genfast {
namespace {

template <typename T, typename Storage>
cudaError_t launch(const LangevinStepTensors& t, double grad_clip, double clamp_lo, double clamp_hi,
                   const std::optional<PhiloxKeyRef>& key, int64_t seed, int64_t offset, cudaStream_t stream) {
  LangevinStepParams<T> params = langevin_step_params<T, Storage>(t, grad_clip, clamp_lo, clamp_hi, seed, offset);
  if (key) params.philox = *key;
  return launch_langevin_step(params, stream);
}

void langevin_step_cuda(const at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& noise,
                        const std::optional<at::Tensor>& row_coefs, at::ArrayRef<double> coefs, double grad_clip,
                        double clamp_lo, double clamp_hi, bool philox_noise,
                        const std::optional<at::Generator>& generator, int64_t seed, int64_t offset,
                        const at::Tensor& out, const std::optional<at::Tensor>& mean_out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const std::optional<PhiloxKeyRef> key =
      cuda_philox_key(kLangevinStepOp, philox_noise && !noise.has_value(), generator, x.device());
  langevin_step_cuda_keyed(x, grad, noise, row_coefs, coefs, grad_clip, clamp_lo, clamp_hi, philox_noise, key, seed,
                           offset, out, mean_out);
}

}  // namespace

void langevin_step_cuda_keyed(const at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& row_coefs, at::ArrayRef<double> coefs,
                              double grad_clip, double clamp_lo, double clamp_hi, bool philox_noise,
                              const std::optional<PhiloxKeyRef>& key, int64_t seed, int64_t offset,
                              const at::Tensor& out, const std::optional<at::Tensor>& mean_out) {
  const LangevinStepTensors t =
      prepare_langevin_step(x, grad, noise, row_coefs, coefs, clamp_lo, clamp_hi, philox_noise, out, mean_out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status;
  switch (x.scalar_type()) {
    case at::kFloat:
      status = launch<float, float>(t, grad_clip, clamp_lo, clamp_hi, key, seed, offset, stream);
      break;
    case at::kHalf:
      status = launch<__half, at::Half>(t, grad_clip, clamp_lo, clamp_hi, key, seed, offset, stream);
      break;
    default:
      status = launch<__nv_bfloat16, at::BFloat16>(t, grad_clip, clamp_lo, clamp_hi, key, seed, offset, stream);
      break;
  }
  TORCH_CHECK(status == cudaSuccess, kLangevinStepOp, ": CUDA launch failed: ", cudaGetErrorString(status));
  finish_langevin_step(t, out, mean_out);
}

TORCH_LIBRARY_IMPL(genfast, CUDA, m) { m.impl("langevin_step", &langevin_step_cuda); }

}  // namespace genfast
