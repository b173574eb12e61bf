// Launcher of the fused denoise step on CUDA; framework-free (raw pointers, a params struct).
#pragma once

#include <cuda_runtime.h>

#include "../common/denoise_step.h"

namespace genfast {

// T is float, __half or __nv_bfloat16. Runs on `stream`; never synchronizes.
template <typename T>
cudaError_t launch_denoise_step(const DenoiseStepParams<T>& params, cudaStream_t stream);

}  // namespace genfast
