// A KV cache's new rows on CUDA (kernels/common/kvcache_append.h); framework-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/kvcache_append.h"

namespace genfast {

// T is float, __half or __nv_bfloat16. Runs on `stream` and never synchronizes.
template <typename T>
cudaError_t launch_kvcache_append(const KvcacheAppendParams<T>& params, cudaStream_t stream);

}  // namespace genfast
