#include "nade.cuh"
#include "nade_warp.cuh"
#include "vector_access.cuh"

namespace genfast {
namespace {

template <typename T, int kPerLane>
__global__ void __launch_bounds__(32 * kNadeWarpsPerBlock) nade_conditionals_kernel(NadeConditionalsParams<T> p) {
  const int64_t row = nade_warp_row();
  if (row >= p.rows) return;  // the whole warp
  const int lane = threadIdx.x % 32;
  if (!nade_warp_ordering_in_range(p.ordering, p.ordering_per_row, row, p.dims, lane)) {
    return nade_warp_fill_nan(p.logits + row * p.dims, p.dims, lane);
  }
  NadeWarpState<kPerLane> state;
  state.load(p.c, p.hidden, lane);
  for (int64_t k = 0; k < p.dims; ++k) {
    const int64_t d = nade_step_dim(p.ordering, p.ordering_per_row, row, p.dims, k);
    const float logit = __ldg(p.b + d) + state.activated_dot(p.activation, p.v + d * p.hidden, p.hidden, lane);
    if (lane == 0) p.logits[row * p.dims + d] = from_float<T>(logit);
    const float value = to_float(p.x[row * p.dims + d]);
    if (value != 0.0f) state.add_scaled(p.w_t + d * p.hidden, value, p.hidden, lane);
  }
}

// Walks the steps backwards from a after the last step (see kernels/common/nade.h), the running
// gradient A in registers beside a.
template <typename T, int kPerLane>
__global__ void __launch_bounds__(32 * kNadeWarpsPerBlock)
    nade_conditionals_backward_kernel(NadeBackwardParams<T> p) {
  const NadeConditionalsParams<T>& f = p.forward;
  const int64_t row = nade_warp_row();
  if (row >= f.rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t H = f.hidden, D = f.dims;
  if (!nade_warp_ordering_in_range(f.ordering, f.ordering_per_row, row, D, lane)) {
    return nade_warp_fill_nan(p.grad_x + row * D, D, lane);
  }
  NadeWarpState<kPerLane> state;
  state.load(f.c, H, lane);
  int64_t remaining = 0;  // nonzero x not yet subtracted again
  for (int64_t d = 0; d < D; ++d) {
    const float value = to_float(f.x[row * D + d]);
    if (value != 0.0f) {
      state.add_scaled(f.w_t + d * H, value, H, lane);
      ++remaining;
    }
  }
  float running[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) running[i] = 0.0f;
  for (int64_t k = D - 1; k >= 0; --k) {
    const int64_t d = nade_step_dim(f.ordering, f.ordering_per_row, row, D, k);
    const float value = to_float(f.x[row * D + d]);
    const float* w_row = f.w_t + d * H;
    float partial = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t h = lane + 32 * i;
      if (h < H) partial += __ldg(w_row + h) * running[i];
    }
    const float grad_x = warp_sum(partial);
    if (lane == 0) p.grad_x[row * D + d] = grad_x;
    if (value != 0.0f) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t h = lane + 32 * i;
        if (h < H) atomicAdd(p.grad_w_t + d * H + h, running[i] * value);
      }
      state.add_scaled(w_row, -value, H, lane);  // back to a_k
      // Before the first nonzero x, a_k is c exactly, as in the forward (ReLU's kink at 0).
      if (--remaining == 0) state.load(f.c, H, lane);
    }
    const float g = to_float(p.grad_logits[row * D + d]);
    if (lane == 0) atomicAdd(p.grad_b + d, g);
    const float* v_row = f.v + d * H;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t h = lane + 32 * i;
      if (h < H) {
        const float activated = nade_activation(f.activation, state.a[i]);
        atomicAdd(p.grad_v + d * H + h, g * activated);
        running[i] += g * __ldg(v_row + h) * nade_activation_grad(f.activation, state.a[i], activated);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t h = lane + 32 * i;
    if (h < H) atomicAdd(p.grad_c + h, running[i]);
  }
}

template <typename T>
struct Forward {
  template <int kPerLane>
  struct Launch {
    static cudaError_t run(const NadeConditionalsParams<T>& p, cudaStream_t stream) {
      nade_conditionals_kernel<T, kPerLane><<<nade_blocks(p.rows), 32 * kNadeWarpsPerBlock, 0, stream>>>(p);
      return cudaGetLastError();
    }
  };
};

template <typename T>
struct Backward {
  template <int kPerLane>
  struct Launch {
    static cudaError_t run(const NadeBackwardParams<T>& p, cudaStream_t stream) {
      nade_conditionals_backward_kernel<T, kPerLane>
          <<<nade_blocks(p.forward.rows), 32 * kNadeWarpsPerBlock, 0, stream>>>(p);
      return cudaGetLastError();
    }
  };
};

}  // namespace

template <typename T>
cudaError_t launch_nade_conditionals(const NadeConditionalsParams<T>& p, cudaStream_t stream) {
  if (p.rows * p.dims == 0) return cudaSuccess;
  return launch_for_hidden<Forward<T>::template Launch>(p.hidden, p, stream);
}

template <typename T>
cudaError_t launch_nade_conditionals_backward(const NadeBackwardParams<T>& p, cudaStream_t stream) {
  if (p.forward.rows * p.forward.dims == 0) return cudaSuccess;
  if (p.num_chunks != 1) return cudaErrorInvalidValue;
  return launch_for_hidden<Backward<T>::template Launch>(p.forward.hidden, p, stream);
}

#define GENFAST_INSTANTIATE_NADE(T)                                                                           \
  template cudaError_t launch_nade_conditionals<T>(const NadeConditionalsParams<T>&, cudaStream_t);           \
  template cudaError_t launch_nade_conditionals_backward<T>(const NadeBackwardParams<T>&, cudaStream_t);
GENFAST_INSTANTIATE_NADE(float)
GENFAST_INSTANTIATE_NADE(__half)
GENFAST_INSTANTIATE_NADE(__nv_bfloat16)
#undef GENFAST_INSTANTIATE_NADE

}  // namespace genfast
