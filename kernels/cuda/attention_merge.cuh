// Merging partial attentions on CUDA (kernels/common/attention_merge.h); framework-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/attention_merge.h"

namespace genfast {

// T is float, __half or __nv_bfloat16. Each runs on `stream` and never synchronizes.
template <typename T>
cudaError_t launch_attention_merge(const AttentionMergeParams<T>& params, cudaStream_t stream);

template <typename T>
cudaError_t launch_attention_merge_backward(const AttentionMergeBackwardParams<T>& params, cudaStream_t stream);

}  // namespace genfast
