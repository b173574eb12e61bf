// The attention backward's first pass, delta = rowsum(grad_o * o) - grad_lse (attention.cuh's
// launch_attention_row_deltas): one warp per row, reading grad_o and o in their own dtypes.
#include <stdint.h>

#include "attention.cuh"
#include "float_conversion.cuh"
#ifndef GENFAST_EMULATED_CUDA
#include "attention_sm80.cuh"  // launch_tiles (kernels/tests/cuda_emulator.h has its own)
#endif

namespace genfast {
namespace attention_cuda {
namespace {

constexpr int kRowDeltasWarps = 8;

template <typename T, typename O>
__global__ void __launch_bounds__(kRowDeltasWarps * 32)
    attention_row_deltas_kernel(const __grid_constant__ AttentionRowDeltasParams<T, O> p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowDeltasWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.batches * p.heads * p.length) return;  // whole warps: the shuffles below see all lanes
  const int64_t position = r % p.length, bh = r / p.length, h = bh % p.heads, b = bh / p.heads;
  const T* grad_o = p.grad_o + b * p.grad_o_stride[0] + h * p.grad_o_stride[1] + position * p.grad_o_stride[2];
  const O* o = p.o + b * p.o_stride[0] + h * p.o_stride[1] + position * p.o_stride[2];
  float sum = 0.0f;
  for (int64_t c = lane; c < p.v_dim; c += 32) sum += to_float(grad_o[c]) * to_float(o[c]);
  for (int lanes = 16; lanes > 0; lanes /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, lanes);
  if (lane == 0) p.delta[r] = p.grad_lse != nullptr ? sum - p.grad_lse[r] : sum;
}

}  // namespace
}  // namespace attention_cuda

template <typename T, typename O>
cudaError_t launch_attention_row_deltas(const AttentionRowDeltasParams<T, O>& p, cudaStream_t stream) {
  using namespace attention_cuda;
  const int64_t rows = p.batches * p.heads * p.length;
  return launch_tiles(attention_row_deltas_kernel<T, O>, (rows + kRowDeltasWarps - 1) / kRowDeltasWarps,
                      kRowDeltasWarps * 32, 0, stream, p);
}

template cudaError_t launch_attention_row_deltas<__half, __half>(const AttentionRowDeltasParams<__half, __half>&,
                                                                 cudaStream_t);
template cudaError_t launch_attention_row_deltas<__half, float>(const AttentionRowDeltasParams<__half, float>&,
                                                                cudaStream_t);
template cudaError_t launch_attention_row_deltas<__nv_bfloat16, __nv_bfloat16>(
    const AttentionRowDeltasParams<__nv_bfloat16, __nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_attention_row_deltas<__nv_bfloat16, float>(
    const AttentionRowDeltasParams<__nv_bfloat16, float>&, cudaStream_t);

}  // namespace genfast
