// genfast::attention_merge and its backward on CUDA: one launch each on the current stream, no
// synchronisation.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../../kernels/cuda/attention_merge.cuh"
#include "../attention_merge_args.h"
#include "launch.h"

namespace genfast {
namespace {

void merge_on_cuda(const std::vector<at::Tensor>& states, const std::vector<at::Tensor>& logs, double ln_base,
                   const at::Tensor& out, const at::Tensor& out_lse) {
  dispatch_cuda_float_types(out.scalar_type(), [&](auto element, auto storage) {
    using T = decltype(element);
    using Storage = decltype(storage);
    check_launch(kAttentionMergeOp,
                 launch_attention_merge(attention_merge_params<T, Storage>(states, logs, ln_base, out, out_lse),
                                        c10::cuda::getCurrentCUDAStream()));
  });
}

std::tuple<at::Tensor, at::Tensor> attention_merge_cuda(at::TensorList o, at::TensorList lse, double ln_base) {
  const c10::cuda::CUDAGuard guard(o.empty() ? c10::Device(c10::kCUDA) : o[0].device());
  return run_attention_merge(o, lse, ln_base, [&](const auto& states, const auto& logs, const auto& out,
                                                  const auto& out_lse) {
    merge_on_cuda(states, logs, ln_base, out, out_lse);
  });
}

void attention_merge_out_cuda(at::TensorList o, at::TensorList lse, double ln_base, const at::Tensor& out,
                              const at::Tensor& out_lse) {
  const c10::cuda::CUDAGuard guard(o.empty() ? c10::Device(c10::kCUDA) : o[0].device());
  run_attention_merge_out(o, lse, ln_base, out, out_lse, [&](const auto& states, const auto& logs,
                                                             const auto& into, const auto& into_lse) {
    merge_on_cuda(states, logs, ln_base, into, into_lse);
  });
}

std::tuple<at::Tensor, at::Tensor> attention_merge_backward_cuda(const at::Tensor& grad_out,
                                                                 const std::optional<at::Tensor>& grad_lse,
                                                                 at::TensorList o, at::TensorList lse,
                                                                 double ln_base) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return run_attention_merge_backward(
      grad_out, grad_lse, o, lse, ln_base,
      [&](const at::Tensor& g, const at::Tensor& g_lse, const std::vector<at::Tensor>& states,
          const std::vector<at::Tensor>& logs, const at::Tensor& grad_o, const at::Tensor& grad_lse_states) {
        dispatch_cuda_float_types(grad_o.scalar_type(), [&](auto element, auto storage) {
          using T = decltype(element);
          using Storage = decltype(storage);
          check_launch(kAttentionMergeOp,
                       launch_attention_merge_backward(attention_merge_backward_params<T, Storage>(
                                                           g, g_lse, states, logs, ln_base, grad_o, grad_lse_states),
                                                       c10::cuda::getCurrentCUDAStream()));
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("attention_merge", &attention_merge_cuda);
  m.impl("attention_merge_out", &attention_merge_out_cuda);
  m.impl("attention_merge_backward", &attention_merge_backward_cuda);
}

}  // namespace genfast
