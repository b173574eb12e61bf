// Launchers of the affine coupling transform and its backward on CUDA; framework-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/affine_coupling.h"

namespace genfast {

// T is float, __half or __nv_bfloat16. Both run on `stream` and never synchronize. An index entry
// at or past layout.transformed (which only a GPU cannot check cheaply) gives NaN, not a stray read.
template <typename T>
cudaError_t launch_affine_coupling(const AffineCouplingParams<T>& params, cudaStream_t stream);

template <typename T>
cudaError_t launch_affine_coupling_backward(const AffineCouplingBackwardParams<T>& params, cudaStream_t stream);

}  // namespace genfast
