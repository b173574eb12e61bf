#include "nade.cuh"
#include "nade_warp.cuh"
#include "vector_access.cuh"

namespace genfast {
namespace {

// The forward's walk, each step drawing x[d] (every lane computes the same uniform: one Philox
// evaluation per warp and step, no divergence).
template <typename T, int kPerLane>
__global__ void __launch_bounds__(32 * kNadeWarpsPerBlock) nade_sample_kernel(NadeSampleParams<T> p) {
  const int64_t row = nade_warp_row();
  if (row >= p.rows) return;
  const int lane = threadIdx.x % 32;
  if (!nade_warp_ordering_in_range(p.ordering, p.ordering_per_row, row, p.dims, lane)) {
    return nade_warp_fill_nan(p.x + row * p.dims, p.dims, lane);
  }
  uint64_t seed = 0, offset = 0;
  resolve_philox_key(p.key, &seed, &offset);
  NadeWarpState<kPerLane> state;
  state.load(p.c, p.hidden, lane);
  for (int64_t k = 0; k < p.dims; ++k) {
    const int64_t d = nade_step_dim(p.ordering, p.ordering_per_row, row, p.dims, k);
    const int64_t element = row * p.dims + d;
    float value;
    if (k < p.num_observed) {
      value = __ldg(p.observed + element);
    } else {
      const float logit = __ldg(p.b + d) + state.activated_dot(p.activation, p.v + d * p.hidden, p.hidden, lane);
      const float u = p.uniforms != nullptr ? __ldg(p.uniforms + element)
                                            : philox_uniform(seed, offset, static_cast<uint64_t>(element));
      value = nade_draw(logit, u);
    }
    if (lane == 0) p.x[element] = from_float<T>(value);
    if (value != 0.0f) state.add_scaled(p.w_t + d * p.hidden, value, p.hidden, lane);
  }
}

template <typename T>
struct Sample {
  template <int kPerLane>
  struct Launch {
    static cudaError_t run(const NadeSampleParams<T>& p, cudaStream_t stream) {
      nade_sample_kernel<T, kPerLane><<<nade_blocks(p.rows), 32 * kNadeWarpsPerBlock, 0, stream>>>(p);
      return cudaGetLastError();
    }
  };
};

}  // namespace

template <typename T>
cudaError_t launch_nade_sample(const NadeSampleParams<T>& p, cudaStream_t stream) {
  if (p.rows * p.dims == 0) return cudaSuccess;
  return launch_for_hidden<Sample<T>::template Launch>(p.hidden, p, stream);
}

template cudaError_t launch_nade_sample<float>(const NadeSampleParams<float>&, cudaStream_t);
template cudaError_t launch_nade_sample<__half>(const NadeSampleParams<__half>&, cudaStream_t);
template cudaError_t launch_nade_sample<__nv_bfloat16>(const NadeSampleParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace genfast
