// Per-sample sums of squares of the Philox noise, on CUDA (see kernels/common/noise_norms.h).
#pragma once

#include <cuda_runtime.h>

#include "../common/noise_norms.h"

namespace genfast {

cudaError_t launch_noise_norms(const NoiseNormsParams& params, cudaStream_t stream);

}  // namespace genfast
