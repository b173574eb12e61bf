// genfast::nade_sample on CUDA: checks, device guard, current stream, the Philox key (from a CUDA
// generator when given: graph-safe), then kernels/cuda.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"
#include "philox_key.h"

#include "../../kernels/cuda/nade.cuh"
#include "../nade_args.h"

namespace genfast {
namespace {

at::Tensor nade_sample_cuda(const at::Tensor& W, const at::Tensor& c, const at::Tensor& V, const at::Tensor& b,
                            int64_t num_samples, at::ScalarType dtype, const std::optional<at::Tensor>& uniforms,
                            const std::optional<at::Tensor>& ordering, const std::optional<at::Tensor>& observed,
                            int64_t num_observed, c10::string_view activation,
                            const std::optional<at::Generator>& generator, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(W.device());
  const NadeTensors t = prepare_nade_sample(W, c, V, b, num_samples, dtype, uniforms, ordering, observed, num_observed,
                                            std::string_view(activation.data(), activation.size()));
  check_nade_cuda_hidden(kNadeSampleOp, t);
  const std::optional<PhiloxKeyRef> from_generator =
      cuda_philox_key(kNadeSampleOp, !uniforms.has_value(), generator, W.device());
  const PhiloxKeyRef key = from_generator.value_or(
      PhiloxKeyRef{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), nullptr, nullptr});
  at::Tensor samples = at::empty({num_samples, W.size(1)}, W.options().dtype(dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float_types(dtype, [&](auto type, auto storage) {
    using T = decltype(type);
    using Storage = decltype(storage);
    check_launch(kNadeSampleOp, launch_nade_sample(nade_sample_params<T, Storage>(t, key, samples), stream));
  });
  return samples;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) { m.impl("nade_sample", &nade_sample_cuda); }

}  // namespace genfast
