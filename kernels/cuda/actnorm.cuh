// Launchers of ActNorm and its backward on CUDA; framework-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/actnorm.h"

namespace genfast {

// T is float, __half or __nv_bfloat16. Both run on `stream` and never synchronize.
template <typename T>
cudaError_t launch_actnorm(const ActNormParams<T>& params, cudaStream_t stream);

// grad_x and one partial sum per (chunk of samples, channel): grid (channels, chunks).
template <typename T>
cudaError_t launch_actnorm_backward(const ActNormBackwardParams<T>& params, cudaStream_t stream);

}  // namespace genfast
