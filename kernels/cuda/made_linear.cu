// MADE's masked linear layer as one masked matrix product C = A B on CUDA cores (float32 FMA),
// the mask computed from the degrees as tiles are staged, never read. Its three products are the
// same kernel with the mask on a different operand (see kernels/triton/made_linear.py):
//   forward      y = x (W * M)^T      A = x,    B = W^T, mask on B, outputs along N
//   grad_x         = g (W * M)        A = g,    B = W,   mask on B, outputs along K
//   grad_weight    = (g^T x) * M      A = g^T,  B = x,   mask on C, outputs along M
#include "made_linear.cuh"
#include "vector_access.cuh"

namespace genfast {
namespace {

enum class MaskOn : int { kBOutN = 0, kBOutK = 1, kCOutM = 2 };

struct MaskedMatmul {
  int64_t m, n, k;
  const float* a;
  int64_t a_stride_m, a_stride_k;
  const float* b;
  int64_t b_stride_k, b_stride_n;
  const float* bias;  // (n) or null
  const int32_t* out_degrees;
  const int32_t* in_degrees;
  bool strict;
};

constexpr int kTile = static_cast<int>(kMadeLinearFeatureTile), kTileK = 16, kThreads = 256, kPerThread = 4;  // 16 x 16 threads, 4 x 4 outputs each

template <MaskOn kMask, typename T>
__global__ void __launch_bounds__(kThreads) masked_matmul_kernel(MaskedMatmul p, T* c, int64_t c_stride_m) {
  __shared__ float a_tile[kTileK][kTile];
  __shared__ float b_tile[kTileK][kTile];
  // Row tiles on the grid's x dimension: rows (a flattened batch) may need more than 65535 tiles.
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile, n0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[kPerThread][kPerThread] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
    for (int e = threadIdx.x; e < kTileK * kTile; e += kThreads) {
      const int kk = e / kTile, mm = e % kTile;
      const int64_t row = m0 + mm, col = n0 + mm, k = k0 + kk;
      a_tile[kk][mm] = row < p.m && k < p.k ? p.a[row * p.a_stride_m + k * p.a_stride_k] : 0.0f;
      float b = col < p.n && k < p.k ? p.b[k * p.b_stride_k + col * p.b_stride_n] : 0.0f;
      if (kMask == MaskOn::kBOutN && col < p.n && k < p.k &&
          !made_connected(p.out_degrees[col], p.in_degrees[k], p.strict)) {
        b = 0.0f;
      }
      if (kMask == MaskOn::kBOutK && col < p.n && k < p.k &&
          !made_connected(p.out_degrees[k], p.in_degrees[col], p.strict)) {
        b = 0.0f;
      }
      b_tile[kk][mm] = b;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a_frag[kPerThread], b_frag[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        a_frag[i] = a_tile[kk][ty + 16 * i];
        b_frag[i] = b_tile[kk][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] = fmaf(a_frag[i], b_frag[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= p.m) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= p.n) continue;
      float v = acc[i][j];
      if (kMask == MaskOn::kCOutM && !made_connected(p.out_degrees[row], p.in_degrees[col], p.strict)) v = 0.0f;
      if (p.bias != nullptr) v += p.bias[col];
      c[row * c_stride_m + col] = from_float<T>(v);
    }
  }
}

// grad_bias[k] = sum over rows of grad_y[:, k], in row order.
__global__ void column_sums_kernel(const float* __restrict__ g, int64_t rows, int64_t cols, float* __restrict__ out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float sum = 0.0f;
  for (int64_t r = 0; r < rows; ++r) sum += g[r * cols + col];
  out[col] = sum;
}

template <MaskOn kMask, typename T>
cudaError_t launch_masked_matmul(const MaskedMatmul& p, T* c, int64_t c_stride_m, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((p.m + kTile - 1) / kTile), static_cast<unsigned>((p.n + kTile - 1) / kTile));
  if (grid.y > 65535) return cudaErrorInvalidValue;  // more than 4M output (or input) features
  masked_matmul_kernel<kMask, T><<<grid, kThreads, 0, stream>>>(p, c, c_stride_m);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_made_linear(const MadeLinearParams<T>& f, cudaStream_t stream) {
  const MaskedMatmul p{f.rows,    f.out_features, f.in_features, f.x,         f.in_features, 1,        f.weight,
                       1,         f.in_features,  f.bias,        f.out_degrees, f.in_degrees, f.strict};
  return launch_masked_matmul<MaskOn::kBOutN>(p, f.y, f.out_features, stream);
}

cudaError_t launch_made_linear_backward(const MadeLinearBackwardParams& p, cudaStream_t stream) {
  const MadeLinearParams<float>& f = p.forward;
  const int64_t rows = f.rows, in = f.in_features, out = f.out_features;
  const MaskedMatmul grad_x{rows, in, out, p.grad_y, out, 1, f.weight, in, 1, nullptr, f.out_degrees, f.in_degrees,
                            f.strict};
  cudaError_t status = launch_masked_matmul<MaskOn::kBOutK>(grad_x, p.grad_x, in, stream);
  if (status != cudaSuccess) return status;
  const MaskedMatmul grad_w{out, in, rows, p.grad_y, 1, out, f.x, in, 1, nullptr, f.out_degrees, f.in_degrees,
                            f.strict};
  status = launch_masked_matmul<MaskOn::kCOutM>(grad_w, p.grad_weight, in, stream);
  if (status != cudaSuccess || out == 0) return status;
  column_sums_kernel<<<static_cast<unsigned>((out + 255) / 256), 256, 0, stream>>>(p.grad_y, rows, out, p.grad_bias);
  return cudaGetLastError();
}

template cudaError_t launch_made_linear<float>(const MadeLinearParams<float>&, cudaStream_t);
template cudaError_t launch_made_linear<__half>(const MadeLinearParams<__half>&, cudaStream_t);
template cudaError_t launch_made_linear<__nv_bfloat16>(const MadeLinearParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace genfast
