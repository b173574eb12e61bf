#include "float_conversion.cuh"
#include "kvcache_append.cuh"
#ifndef GENFAST_EMULATED_CUDA
#include "attention_sm80.cuh"  // launch_tiles (kernels/tests/cuda_emulator.h has its own, which runs this on the host)
#endif

namespace genfast {
namespace {

constexpr int kThreads = 128;

// Feature j of a head row at x, turned at the rotary tables' row (cos, sin); copied past the planes.
template <typename T>
__device__ __forceinline__ float turned_feature(const KvcacheAppendParams<T>& p, const T* x, int64_t j,
                                                const T* cos, const T* sin) {
  if (cos == nullptr || j >= 2 * p.half) return to_float(x[j]);
  const int64_t m = rotary_plane_of(j, p.half, p.interleaved);
  return rotary_feature(j, p.half, p.interleaved, to_float(x[j]), to_float(x[rotary_partner(j, p.half, p.interleaved)]),
                        to_float(cos[m]), to_float(sin[m]));
}

// One block per row: a new row's keys (turned) and values into the caches, or a query row turned.
template <typename T>
__global__ void kvcache_append_kernel(KvcacheAppendParams<T> p) {
  const int64_t key_rows = p.batch * p.new_rows;
  const int64_t task = blockIdx.x;
  if (task < key_rows) {
    const int64_t n = task / p.new_rows, row = task % p.new_rows;
    const int64_t position = static_cast<int64_t>(p.cache_seqlens[n]) + row;
    const bool turned = p.cos != nullptr && position >= 0 && position < p.table_rows;
    const T* cos = turned ? p.cos + position * p.half : nullptr;
    const T* sin = turned ? p.sin + position * p.half : nullptr;
    T* keys = p.k_cache + kvcache_row_offset(p, n, row, p.k_cache_strides);
    T* values = p.v_cache + kvcache_row_offset(p, n, row, p.v_cache_strides);
    for (int64_t i = threadIdx.x; i < p.kv_heads * p.head_dim; i += kThreads) {
      const int64_t h = i / p.head_dim, j = i % p.head_dim;
      keys[h * p.k_cache_strides[2] + j] =
          from_float<T>(turned_feature(p, p.k + (task * p.kv_heads + h) * p.head_dim, j, cos, sin));
    }
    for (int64_t i = threadIdx.x; i < p.kv_heads * p.v_dim; i += kThreads) {
      const int64_t h = i / p.v_dim, j = i % p.v_dim;
      values[h * p.v_cache_strides[2] + j] = p.v[task * p.kv_heads * p.v_dim + i];
    }
  } else {
    const int64_t q_task = task - key_rows, n = q_task / p.q_rows, row = q_task % p.q_rows;
    const int64_t position = kvcache_query_position(p, n, row);
    const bool turned = position >= 0 && position < p.table_rows;
    const T* cos = turned ? p.cos + position * p.half : nullptr;
    const T* sin = turned ? p.sin + position * p.half : nullptr;
    const int64_t offset = q_task * p.q_heads * p.head_dim;
    for (int64_t i = threadIdx.x; i < p.q_heads * p.head_dim; i += kThreads) {
      const int64_t h = i / p.head_dim, j = i % p.head_dim;
      p.q_out[offset + i] = from_float<T>(turned_feature(p, p.q + offset + h * p.head_dim, j, cos, sin));
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_kvcache_append(const KvcacheAppendParams<T>& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.new_rows + (p.q != nullptr ? p.batch * p.q_rows : 0);
  if (rows == 0) return cudaSuccess;
  return attention_cuda::launch_tiles(kvcache_append_kernel<T>, rows, kThreads, 0, stream, p);
}

template cudaError_t launch_kvcache_append<float>(const KvcacheAppendParams<float>&, cudaStream_t);
template cudaError_t launch_kvcache_append<__half>(const KvcacheAppendParams<__half>&, cudaStream_t);
template cudaError_t launch_kvcache_append<__nv_bfloat16>(const KvcacheAppendParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace genfast
