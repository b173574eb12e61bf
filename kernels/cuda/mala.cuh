// The two passes of MALA's accept/reject on CUDA (kernels/common/mala.h); framework-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/mala.h"

namespace genfast {

// T is float, __half or __nv_bfloat16. Both run on `stream` and never synchronize.
template <typename T>
cudaError_t launch_mala_sums(const MalaSumsParams<T>& params, cudaStream_t stream);

template <typename T>
cudaError_t launch_mala_select(const MalaSelectParams<T>& params, cudaStream_t stream);

}  // namespace genfast
