// Rotary position embedding on CUDA (kernels/common/rotary.h); framework-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/rotary.h"

namespace genfast {

// T is float, __half or __nv_bfloat16. Runs on `stream` and never synchronizes.
template <typename T>
cudaError_t launch_rotary(const RotaryParams<T>& params, cudaStream_t stream);

}  // namespace genfast
