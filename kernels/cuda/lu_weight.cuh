// Launchers of the LU-parameterized 1x1-convolution weight and its backward on CUDA; framework-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/lu_weight.h"

namespace genfast {

cudaError_t launch_lu_weight(const LuWeightParams& params, cudaStream_t stream);
cudaError_t launch_lu_weight_backward(const LuWeightBackwardParams& params, cudaStream_t stream);

}  // namespace genfast
