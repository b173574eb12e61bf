// genfast::kvcache_append on CUDA: one launch on the current stream, no synchronisation (the rows'
// positions and pages are read on the device, and not checked there).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../../kernels/cuda/kvcache_append.cuh"
#include "../kvcache_append_args.h"
#include "launch.h"

namespace genfast {
namespace {

void kvcache_append_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache_seqlens,
                         const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& block_table,
                         const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
                         bool rotary_interleaved, const std::optional<at::Tensor>& q, bool queries_in_sequence,
                         const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& q_out) {
  const c10::cuda::CUDAGuard guard(k.device());
  check_kvcache_append(k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin, q, k_cache, v_cache,
                       q_out);
  const at::Tensor q_dst = contiguous_output_if(q_out);
  std::vector<at::Tensor> keep;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_float_types(k.scalar_type(), [&](auto element, auto storage) {
    using T = decltype(element);
    using Storage = decltype(storage);
    check_launch(kKvcacheAppendOp, launch_kvcache_append(kvcache_append_params<T, Storage>(
        k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin, rotary_interleaved, q,
        queries_in_sequence, k_cache, v_cache, q_dst, keep), stream));
  });
  copy_back_if_buffered(q_dst, q_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) { m.impl("kvcache_append", &kvcache_append_cuda); }

}  // namespace genfast
