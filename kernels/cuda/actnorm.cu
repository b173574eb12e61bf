#include "actnorm.cuh"
#include "block_reduce.cuh"
#include "vector_access.cuh"

namespace genfast {
namespace {

constexpr int kActNormReduceThreads = 256;

template <typename T>
__global__ void actnorm_kernel(ActNormParams<T> p, int64_t numel, bool vector_ok) {
  const int64_t stride = 4 * static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x); i < numel; i += stride) {
    const int count = numel - i < 4 ? static_cast<int>(numel - i) : 4;
    float x[4], y[4];
    load_group(p.x, i, count, vector_ok, x);
    // One division per group; the channel then advances with the elements.
    const int64_t run = i / p.inner;
    int64_t within = i - run * p.inner, c = run % p.channels;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      y[k] = k < count ? actnorm_value(x[k], __ldg(p.log_scale + c), __ldg(p.bias + c), p.glow_order, p.inverse)
                       : 0.0f;
      if (++within == p.inner) {
        within = 0;
        c = c + 1 == p.channels ? 0 : c + 1;
      }
    }
    store_group(p.y, i, count, vector_ok, y);
  }
}

// Block (c, chunk) walks the chunk's samples' runs of channel c. Channels on the grid's x
// dimension: (B, D) inputs may have more than 65535 of them.
template <typename T>
__global__ void actnorm_backward_kernel(ActNormBackwardParams<T> p) {
  const int64_t c = blockIdx.x, chunk = blockIdx.y;
  const int64_t first_row = chunk * p.rows_per_chunk;
  const int64_t last_row = first_row + p.rows_per_chunk < p.rows ? first_row + p.rows_per_chunk : p.rows;
  const int64_t count = (last_row - first_row) * p.inner;
  const float log_scale = p.log_scale[c], bias = p.bias[c];
  float sum_ls = 0.0f, sum_b = 0.0f;
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    const int64_t row = first_row + e / p.inner;
    const int64_t i = (row * p.channels + c) * p.inner + e % p.inner;
    const ActNormGrads r =
        actnorm_grads(to_float(p.x[i]), to_float(p.grad_y[i]), log_scale, bias, p.glow_order, p.inverse);
    p.grad_x[i] = from_float<T>(r.x);
    sum_ls += r.log_scale;
    sum_b += r.bias;
  }
  const float total_ls = block_sum(sum_ls);
  const float total_b = block_sum(sum_b);
  if (threadIdx.x == 0) {
    p.partial_log_scale[chunk * p.channels + c] = total_ls;
    p.partial_bias[chunk * p.channels + c] = total_b;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_actnorm(const ActNormParams<T>& p, cudaStream_t stream) {
  const int64_t numel = p.rows * p.channels * p.inner;
  if (numel == 0) return cudaSuccess;
  const bool vector_ok = aligned4(p.x) && aligned4(p.y);
  actnorm_kernel<T><<<elementwise_blocks((numel + 3) / 4), kElementwiseThreads, 0, stream>>>(p, numel, vector_ok);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_actnorm_backward(const ActNormBackwardParams<T>& p, cudaStream_t stream) {
  if (p.rows * p.channels * p.inner == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.channels), static_cast<unsigned>(p.num_chunks));
  actnorm_backward_kernel<T><<<grid, kActNormReduceThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define GENFAST_INSTANTIATE_ACTNORM(T)                                                                \
  template cudaError_t launch_actnorm<T>(const ActNormParams<T>&, cudaStream_t);                      \
  template cudaError_t launch_actnorm_backward<T>(const ActNormBackwardParams<T>&, cudaStream_t);
GENFAST_INSTANTIATE_ACTNORM(float)
GENFAST_INSTANTIATE_ACTNORM(__half)
GENFAST_INSTANTIATE_ACTNORM(__nv_bfloat16)
#undef GENFAST_INSTANTIATE_ACTNORM

}  // namespace genfast
