#include "mala.cuh"
#include "vector_access.cuh"

namespace genfast {
namespace {

constexpr int kSumThreads = 256;

// One block per (row, chunk), rows on the grid's x dimension (y and z stop at 65535); the block
// adds its threads' sums in a fixed order (deterministic).
template <typename T>
__global__ void mala_sums_kernel(MalaSumsParams<T> p) {
  const int64_t row = blockIdx.x, chunk = blockIdx.y;
  const int64_t begin = row * p.row_size + chunk * p.chunk_size;
  const int64_t row_end = (row + 1) * p.row_size;
  const int64_t end = begin + p.chunk_size < row_end ? begin + p.chunk_size : row_end;
  const float eps = p.step_size[p.step_size_per_row ? row : 0];
  float sum = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    sum += mala_ratio_term(eps, to_float(p.x[i]), to_float(p.y[i]), to_float(p.grad_x[i]), to_float(p.grad_y[i]));
  }
  __shared__ float sums[kSumThreads];
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kSumThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) p.partial[row * p.num_chunks + chunk] = sums[0];
}

// Each element reads only the source its row keeps; rows kept in place are not written.
template <typename T>
__global__ void mala_select_kernel(MalaSelectParams<T> p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += stride) {
    const bool accept = p.accepted[i / p.row_size];
    const T* x_src = accept ? p.y : p.x;
    const T* g_src = accept ? p.grad_y : p.grad_x;
    if (x_src != p.x_out) p.x_out[i] = x_src[i];
    if (g_src != p.grad_out) p.grad_out[i] = g_src[i];
  }
}

}  // namespace

template <typename T>
cudaError_t launch_mala_sums(const MalaSumsParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0 || p.row_size == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(p.num_chunks));
  mala_sums_kernel<T><<<grid, kSumThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mala_select(const MalaSelectParams<T>& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  mala_select_kernel<T><<<elementwise_blocks(p.numel / 4 + 1), kElementwiseThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define GENFAST_INSTANTIATE_MALA(T)                                                       \
  template cudaError_t launch_mala_sums<T>(const MalaSumsParams<T>&, cudaStream_t);       \
  template cudaError_t launch_mala_select<T>(const MalaSelectParams<T>&, cudaStream_t);
GENFAST_INSTANTIATE_MALA(float)
GENFAST_INSTANTIATE_MALA(__half)
GENFAST_INSTANTIATE_MALA(__nv_bfloat16)
#undef GENFAST_INSTANTIATE_MALA

}  // namespace genfast
