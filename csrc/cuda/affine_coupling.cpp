// genfast::affine_coupling and its backward on CUDA: checks, device guard, current stream, then
// kernels/cuda. A .cpp on purpose: only the framework-free kernels go through nvcc.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"

#include "../../kernels/cuda/affine_coupling.cuh"
#include "../affine_coupling_args.h"

namespace genfast {
namespace {

void check_coupling_grid(const CouplingTensors& t) {
  check_grid_y(kAffineCouplingOp, "a sample's element count", t.layout.row_size, kCouplingChunk);
}

// fn(T{}, Storage{}) for the CUDA element type T and the tensor's element type Storage.
std::tuple<at::Tensor, at::Tensor> affine_coupling_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                        const at::Tensor& scale, const at::Tensor& index,
                                                        c10::string_view scale_fn, double scale_param,
                                                        bool glow_order, bool inverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ScaleFn fn = parse_scale_fn(std::string_view(scale_fn.data(), scale_fn.size()), scale_param);
  const CouplingTensors t = prepare_coupling(x, shift, scale, index);
  check_coupling_grid(t);
  const CouplingOutputs out = coupling_outputs(x, t);
  if (t.layout.rows == 0) return {out.y, out.partial.sum(1)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float_types(x.scalar_type(), [&](auto type, auto storage) {
    using T = decltype(type);
    using Storage = decltype(storage);
    check_launch(kAffineCouplingOp, launch_affine_coupling(
        coupling_params<T, Storage>(t, fn, scale_param, glow_order, inverse, out.y, out.partial), stream));
  });
  return {out.y, coupling_logdet(out.partial)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x, const at::Tensor& shift,
    const at::Tensor& scale, const at::Tensor& index, c10::string_view scale_fn, double scale_param,
    bool glow_order, bool inverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ScaleFn fn = parse_scale_fn(std::string_view(scale_fn.data(), scale_fn.size()), scale_param);
  const CouplingTensors t = prepare_coupling(x, shift, scale, index);
  check_coupling_grid(t);
  const auto [g, g_logdet] = prepare_coupling_grads(grad_y, grad_logdet, x, t);
  const auto [grad_x, grad_shift, grad_scale] = coupling_grad_outputs(x, shift, scale);
  if (t.layout.rows == 0) return {grad_x, grad_shift, grad_scale};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float_types(x.scalar_type(), [&](auto type, auto storage) {
    using T = decltype(type);
    using Storage = decltype(storage);
    check_launch(kAffineCouplingOp, launch_affine_coupling_backward(
        coupling_backward_params<T, Storage>(t, fn, scale_param, glow_order, inverse, g, g_logdet, grad_x,
                                             grad_shift, grad_scale),
        stream));
  });
  return {grad_x, grad_shift, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("affine_coupling", &affine_coupling_cuda);
  m.impl("affine_coupling_backward", &affine_coupling_backward_cuda);
}

}  // namespace genfast
