// Device helpers shared by the elementwise CUDA kernels: float conversion (float_conversion.cuh) and
// accesses of four consecutive elements (one aligned vector access when every pointer allows it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "float_conversion.cuh"
#include "vector_pack.cuh"

namespace genfast {

// Four consecutive elements moved as one aligned access (16 bytes for float, 8 for 16-bit types).
template <typename T>
using Pack4 = Pack<T, 4>;

template <typename T>
__device__ __forceinline__ void load4(const T* base, int64_t i, bool vector_ok, float out[4]) {
  if (vector_ok) {
    const Pack4<T> p = *reinterpret_cast<const Pack4<T>*>(base + i);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = to_float(p.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = to_float(base[i + j]);
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* base, int64_t i, bool vector_ok, const float in[4]) {
  if (vector_ok) {
    Pack4<T> p;
#pragma unroll
    for (int j = 0; j < 4; ++j) p.v[j] = from_float<T>(in[j]);
    *reinterpret_cast<Pack4<T>*>(base + i) = p;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) base[i + j] = from_float<T>(in[j]);
  }
}

template <typename T>
__device__ __forceinline__ void load_tail(const T* base, int64_t i, int count, float out[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = j < count ? to_float(base[i + j]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void store_tail(T* base, int64_t i, int count, const float in[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (j < count) base[i + j] = from_float<T>(in[j]);
}

// Elements i .. i + count - 1 (count <= 4): one vector access when the group is whole.
template <typename T>
__device__ __forceinline__ void load_group(const T* base, int64_t i, int count, bool vector_ok, float out[4]) {
  if (count == 4) load4(base, i, vector_ok, out); else load_tail(base, i, count, out);
}

template <typename T>
__device__ __forceinline__ void store_group(T* base, int64_t i, int count, bool vector_ok, const float in[4]) {
  if (count == 4) store4(base, i, vector_ok, in); else store_tail(base, i, count, in);
}

template <typename T>
bool aligned4(const T* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % (4 * sizeof(T)) == 0;
}


// The coefficients of elements i .. i + count - 1 (count <= 4): their rows of row_coefs (rows of
// kNumCoefs covering row_size elements each), or `coefs` for all when row_coefs is null; lanes past
// count repeat element i's row (the row after the last element's may lie past the buffer). They go
// to registers; reading them through a pointer that may address the kernel parameters would force
// a stack copy of the parameter struct.
template <int kNumCoefs>
__device__ __forceinline__ void load_coefs4(const float* row_coefs, const float (&coefs)[kNumCoefs], int64_t i,
                                            int count, int64_t row_size, float c[4][kNumCoefs]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t element = i + (j < count ? j : 0);
    const float* src = row_coefs == nullptr ? nullptr : row_coefs + (element / row_size) * kNumCoefs;
#pragma unroll
    for (int k = 0; k < kNumCoefs; ++k) c[j][k] = src == nullptr ? coefs[k] : src[k];
  }
}

// Blocks of kElementwiseThreads threads, each handling groups of four elements in a grid-stride
// loop: enough blocks to fill the machine several times over, no more.
constexpr int kElementwiseThreads = 256;

inline int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};  // 0: not asked yet; a benign race asks twice at worst
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= kMaxDevices) return 132;
  if (counts[device] == 0) {
    int num_sms = 0;
    cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
    counts[device] = num_sms > 0 ? num_sms : 132;
  }
  return counts[device];
}

inline unsigned elementwise_blocks(int64_t num_groups) {
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count()) * 16;
  const int64_t wanted = (num_groups + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(wanted < max_blocks ? wanted : max_blocks);
}


// Launches kernel<true> when the op draws Philox noise, else kernel<false>: Kernel is a template
// over that flag taking (params, vector_ok).
template <typename Params>
cudaError_t launch_elementwise(void (*philox_kernel)(Params, bool), void (*plain_kernel)(Params, bool),
                               const Params& params, int64_t numel, bool philox, bool vector_ok, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const unsigned blocks = elementwise_blocks((numel + 3) / 4);
  (philox ? philox_kernel : plain_kernel)<<<blocks, kElementwiseThreads, 0, stream>>>(params, vector_ok);
  return cudaGetLastError();
}

}  // namespace genfast
