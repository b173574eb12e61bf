#include "lu_weight.cuh"

namespace genfast {
namespace {

constexpr int kLuThreads = 256;

// One thread per entry (i, j) of W.
__global__ void lu_weight_kernel(LuWeightParams p) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.n * p.n) return;
  p.weight[e] = lu_weight_entry(p, e / p.n, e % p.n);
}

// One thread per (i, k): d lower[perm[i], k], and entry (i, k) of dU (with the diagonal).
__global__ void lu_weight_backward_kernel(LuWeightBackwardParams p) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.n * p.n) return;
  const int64_t i = e / p.n, k = e % p.n;
  const int64_t r = p.perm[i];
  if (lu_row_in_range(r, p.n)) p.grad_lower[r * p.n + k] = k < r ? lu_grad_lower_entry(p, i, k) : 0.0f;
  const float d = k >= i ? lu_grad_upper_entry(p, i, k) : 0.0f;
  p.grad_upper[e] = k > i ? d : 0.0f;
  if (k == i) p.grad_diag[i] = d;
}

unsigned lu_blocks(int64_t n) { return static_cast<unsigned>((n * n + kLuThreads - 1) / kLuThreads); }

}  // namespace

cudaError_t launch_lu_weight(const LuWeightParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  lu_weight_kernel<<<lu_blocks(p.n), kLuThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_lu_weight_backward(const LuWeightBackwardParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  lu_weight_backward_kernel<<<lu_blocks(p.n), kLuThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace genfast
