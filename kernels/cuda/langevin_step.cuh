// Launcher of the fused Langevin step on CUDA; framework-free (raw pointers, a params struct).
#pragma once

#include <cuda_runtime.h>

#include "../common/langevin_step.h"

namespace genfast {

// T is float, __half or __nv_bfloat16. Runs on `stream`; never synchronizes.
template <typename T>
cudaError_t launch_langevin_step(const LangevinStepParams<T>& params, cudaStream_t stream);

}  // namespace genfast
