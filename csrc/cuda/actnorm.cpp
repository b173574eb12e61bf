// genfast::actnorm and its backward on CUDA: checks, device guard, current stream, then kernels/cuda.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"

#include "../../kernels/cuda/actnorm.cuh"
#include "../actnorm_args.h"

namespace genfast {
namespace {

std::tuple<at::Tensor, at::Tensor> actnorm_cuda(const at::Tensor& x, const at::Tensor& log_scale,
                                                const at::Tensor& bias, bool glow_order, bool inverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ActNormTensors t = prepare_actnorm(x, log_scale, bias);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float_types(x.scalar_type(), [&](auto type, auto storage) {
    using T = decltype(type);
    using Storage = decltype(storage);
    check_launch(kActNormOp, launch_actnorm(actnorm_params<T, Storage>(t, y, glow_order, inverse), stream));
  });
  return {y, actnorm_logdet(t, inverse)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_backward_cuda(const at::Tensor& grad_y,
                                                                     const at::Tensor& grad_logdet,
                                                                     const at::Tensor& x, const at::Tensor& log_scale,
                                                                     const at::Tensor& bias, bool glow_order,
                                                                     bool inverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ActNormTensors t = prepare_actnorm(x, log_scale, bias);
  // At most 65535 chunks, the launch's grid.y: more samples a chunk where the shape would make more.
  const int64_t rows_per_chunk = std::max(actnorm_rows_per_chunk(t), (t.rows + 65534) / 65535);
  const ActNormGradTensors g = prepare_actnorm_grads(grad_y, grad_logdet, x, t, rows_per_chunk);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float_types(x.scalar_type(), [&](auto type, auto storage) {
    using T = decltype(type);
    using Storage = decltype(storage);
    check_launch(kActNormOp,
                 launch_actnorm_backward(actnorm_backward_params<T, Storage>(t, g, glow_order, inverse), stream));
  });
  return finish_actnorm_grads(g, grad_logdet, t, log_scale, bias, inverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("actnorm", &actnorm_cuda);
  m.impl("actnorm_backward", &actnorm_backward_cuda);
}

}  // namespace genfast
