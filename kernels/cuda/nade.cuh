// Launchers of binary NADE's conditionals, their backward and sampling on CUDA; framework-free.
// One warp per sample: its lanes hold the running pre-activations of the H hidden units in
// registers (unit lane + 32 i in slot i), so the D sequential steps need no shared memory and no
// block synchronization; each step's dot product is a warp shuffle sum (fixed order).
#pragma once

#include <cuda_runtime.h>

#include "../common/nade.h"

namespace genfast {

// T is float, __half or __nv_bfloat16 (x, logits, grad_logits, samples). All run on `stream`,
// never synchronize, and return cudaErrorInvalidValue when hidden > kNadeCudaMaxHidden.
template <typename T>
cudaError_t launch_nade_conditionals(const NadeConditionalsParams<T>& params, cudaStream_t stream);

// Gradients summed over samples with atomic adds into one chunk (num_chunks == 1), zeroed by the
// caller; grad_x written.
template <typename T>
cudaError_t launch_nade_conditionals_backward(const NadeBackwardParams<T>& params, cudaStream_t stream);

template <typename T>
cudaError_t launch_nade_sample(const NadeSampleParams<T>& params, cudaStream_t stream);

}  // namespace genfast
