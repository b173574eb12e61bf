// Launchers of MADE's masked linear layer and its backward on CUDA; framework-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/made_linear.h"

namespace genfast {

// The kernels put tiles of this many output (backward: input) features on grid.y, at most 65535.
constexpr int64_t kMadeLinearFeatureTile = 64;

// T is float, __half or __nv_bfloat16 (y). Both run on `stream` and never synchronize.
template <typename T>
cudaError_t launch_made_linear(const MadeLinearParams<T>& params, cudaStream_t stream);

cudaError_t launch_made_linear_backward(const MadeLinearBackwardParams& params, cudaStream_t stream);

}  // namespace genfast
