// genfast::made_linear and its backward on CUDA: checks, device guard, current stream, then
// kernels/cuda.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"

#include "../../kernels/cuda/made_linear.cuh"
#include "../made_linear_args.h"

namespace genfast {
namespace {


at::Tensor made_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& in_degrees, const at::Tensor& out_degrees, bool strict) {
  const c10::cuda::CUDAGuard guard(x.device());
  const MadeLinearTensors t = prepare_made_linear(x, weight, bias, in_degrees, out_degrees);
  // grid.y: tiles of the output features (the backward's: of the input features)
  check_grid_y(kMadeLinearOp, "weight's output feature count", weight.size(0), kMadeLinearFeatureTile);
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float_types(x.scalar_type(), [&](auto type, auto storage) {
    using T = decltype(type);
    using Storage = decltype(storage);
    check_launch(kMadeLinearOp, launch_made_linear(made_linear_params<T, Storage>(t, strict, y), stream));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> made_linear_backward_cuda(const at::Tensor& grad_y,
                                                                         const at::Tensor& x,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& in_degrees,
                                                                         const at::Tensor& out_degrees, bool strict) {
  const c10::cuda::CUDAGuard guard(x.device());
  const MadeLinearTensors t = prepare_made_linear(x, weight, std::nullopt, in_degrees, out_degrees);
  check_grid_y(kMadeLinearOp, "weight's input feature count", weight.size(1), kMadeLinearFeatureTile);
  MadeLinearGradTensors g = prepare_made_linear_grads(grad_y, t);
  check_launch(kMadeLinearOp, launch_made_linear_backward(made_linear_backward_params(t, strict, g),
                                                          c10::cuda::getCurrentCUDAStream()));
  return finish_made_linear_grads(g, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("made_linear", &made_linear_cuda);
  m.impl("made_linear_backward", &made_linear_backward_cuda);
}

}  // namespace genfast
