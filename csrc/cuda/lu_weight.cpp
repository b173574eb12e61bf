// genfast::lu_weight and its backward on CUDA: checks, device guard, current stream, then kernels/cuda.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"

#include "../../kernels/cuda/lu_weight.cuh"
#include "../lu_weight_args.h"

namespace genfast {
namespace {

std::tuple<at::Tensor, at::Tensor> lu_weight_cuda(const at::Tensor& lower, const at::Tensor& upper,
                                                  const at::Tensor& log_diag, const at::Tensor& sign,
                                                  const at::Tensor& perm) {
  const c10::cuda::CUDAGuard guard(lower.device());
  const LuTensors t = prepare_lu(lower, upper, log_diag, sign, perm);
  at::Tensor weight = at::empty_like(t.lower);
  check_launch(kLuWeightOp, launch_lu_weight(lu_weight_params(t, weight), c10::cuda::getCurrentCUDAStream()));
  return {weight, log_diag.sum()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lu_weight_backward_cuda(const at::Tensor& grad_weight,
                                                                       const at::Tensor& grad_logabsdet,
                                                                       const at::Tensor& lower,
                                                                       const at::Tensor& upper,
                                                                       const at::Tensor& log_diag,
                                                                       const at::Tensor& sign,
                                                                       const at::Tensor& perm) {
  const c10::cuda::CUDAGuard guard(lower.device());
  const LuTensors t = prepare_lu(lower, upper, log_diag, sign, perm);
  const LuGradTensors g = prepare_lu_grads(grad_weight, grad_logabsdet, t);
  check_launch(kLuWeightOp, launch_lu_weight_backward(lu_weight_backward_params(t, g), c10::cuda::getCurrentCUDAStream()));
  return {g.grad_lower, g.grad_upper, finish_log_diag_grad(g, t, grad_logabsdet)};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("lu_weight", &lu_weight_cuda);
  m.impl("lu_weight_backward", &lu_weight_backward_cuda);
}

}  // namespace genfast
