#include "noise_norms.cuh"

namespace genfast {
namespace {

constexpr int kNormThreads = 256;

// One block per (row, chunk), rows on the grid's x dimension (y and z stop at 65535): each thread sums z^2 over some groups of four, then the block adds
// its threads' sums in a fixed order, so that the result does not depend on scheduling.
__global__ void noise_norms_kernel(NoiseNormsParams p) {
  const int64_t row = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  uint64_t seed, offset;
  resolve_philox_key(p.philox, &seed, &offset);
  const int64_t row_begin = row * p.row_size;
  const int64_t begin = row_begin + chunk * p.chunk_size;
  const int64_t end = min(begin + p.chunk_size, row_begin + p.row_size);
  float sum = 0.0f;
  for (int64_t group = begin / 4 + threadIdx.x; group * 4 < end; group += blockDim.x) {
    const int64_t first = group * 4 > begin ? group * 4 : begin;
    const int64_t last = group * 4 + 4 < end ? group * 4 + 4 : end;
    sum += philox_sum_squares(seed, offset, first, last);
  }
  __shared__ float sums[kNormThreads];
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kNormThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) p.partial[row * p.num_chunks + chunk] = sums[0];
}

}  // namespace

cudaError_t launch_noise_norms(const NoiseNormsParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.row_size == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(p.num_chunks));
  noise_norms_kernel<<<grid, kNormThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace genfast
