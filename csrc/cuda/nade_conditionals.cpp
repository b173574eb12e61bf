// genfast::nade_conditionals and its backward on CUDA: checks, device guard, current stream, then
// kernels/cuda.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"

#include "../../kernels/cuda/nade.cuh"
#include "../nade_args.h"

namespace genfast {
namespace {

at::Tensor nade_conditionals_cuda(const at::Tensor& x, const at::Tensor& W, const at::Tensor& c, const at::Tensor& V,
                                  const at::Tensor& b, const std::optional<at::Tensor>& ordering,
                                  c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(x.device());
  const NadeTensors t =
      prepare_nade(x, W, c, V, b, ordering, std::string_view(activation.data(), activation.size()));
  check_nade_cuda_hidden(kNadeOp, t);
  at::Tensor logits = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float_types(x.scalar_type(), [&](auto type, auto storage) {
    using T = decltype(type);
    using Storage = decltype(storage);
    check_launch(kNadeOp, launch_nade_conditionals(nade_params<T, Storage>(t, logits), stream));
  });
  return logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nade_conditionals_backward_cuda(
    const at::Tensor& grad_logits, const at::Tensor& x, const at::Tensor& W, const at::Tensor& c,
    const at::Tensor& V, const at::Tensor& b, const std::optional<at::Tensor>& ordering, c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(x.device());
  const NadeTensors t =
      prepare_nade(x, W, c, V, b, ordering, std::string_view(activation.data(), activation.size()));
  check_nade_cuda_hidden(kNadeOp, t);
  // One chunk: the kernel sums over samples with atomic adds.
  NadeGradTensors g = prepare_nade_grads(grad_logits, t, std::max<int64_t>(1, x.size(0)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float_types(x.scalar_type(), [&](auto type, auto storage) {
    using T = decltype(type);
    using Storage = decltype(storage);
    check_launch(kNadeOp, launch_nade_conditionals_backward(nade_backward_params<T, Storage>(t, g), stream));
  });
  return finish_nade_grads(g, x, W, c, V, b);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("nade_conditionals", &nade_conditionals_cuda);
  m.impl("nade_conditionals_backward", &nade_conditionals_backward_cuda);
}

}  // namespace genfast
