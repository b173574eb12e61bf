#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/philox.h"
#include "denoise_step.cuh"

namespace genfast {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Four consecutive elements moved as one aligned access (16 bytes for float, 8 for 16-bit types).
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

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

// One thread handles groups of four elements, which share one Philox call.
template <typename T, bool kPhilox>
__global__ void denoise_step_kernel(DenoiseStepParams<T> p, bool vector_ok) {
  const int64_t num_groups = (p.numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint64_t seed = 0, offset = 0;
  if (kPhilox) resolve_philox_key(p.philox, &seed, &offset);
  for (int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; group < num_groups;
       group += stride) {
    const int64_t i = group * 4;
    const int count = p.numel - i < 4 ? static_cast<int>(p.numel - i) : 4;
    const bool full = count == 4;
    auto load = [&](const T* base, float out[4]) {
      if (full) load4(base, i, vector_ok, out); else load_tail(base, i, count, out);
    };

    // Coefficients live in registers; reading them through a pointer that may address the
    // kernel parameters would force a stack copy of the parameter struct.
    float c[4][kNumDenoiseCoefs];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float* src = p.row_coefs == nullptr ? nullptr : p.row_coefs + ((i + j) / p.row_size) * kNumDenoiseCoefs;
#pragma unroll
      for (int k = 0; k < kNumDenoiseCoefs; ++k) c[j][k] = src == nullptr ? p.coefs.v[k] : src[k];
    }

    float x[4], m[4], z[4] = {0.f, 0.f, 0.f, 0.f}, d[4] = {0.f, 0.f, 0.f, 0.f};
    load(p.sample, x);
    load(p.model_output, m);
    if (p.model_output_cond != nullptr) {
      float mc[4];
      load(p.model_output_cond, mc);
#pragma unroll
      for (int j = 0; j < 4; ++j) m[j] = guided_output(m[j], mc[j], c[j][kGuidanceScale]);
    }
    if (kPhilox) {
      const Float4x32 n = philox_normal4(seed, offset, static_cast<uint64_t>(group));
      z[0] = n.x; z[1] = n.y; z[2] = n.z; z[3] = n.w;
    } else if (p.noise_source == NoiseSource::kTensor) {
      load(p.noise, z);
    }
    if (p.derivative != nullptr) load(p.derivative, d);

    float out[4], x0[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      x0[j] = predicted_original(c[j], p.clip, p.clip_lo, p.clip_hi, x[j], m[j], z[j]);
      out[j] = denoised(c[j], x0[j], x[j], m[j], z[j], d[j]);
    }
    if (full) store4(p.out, i, vector_ok, out); else store_tail(p.out, i, count, out);
    if (p.pred_original != nullptr) {
      if (full) store4(p.pred_original, i, vector_ok, x0); else store_tail(p.pred_original, i, count, x0);
    }
  }
}

template <typename T>
bool aligned4(const T* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % (4 * sizeof(T)) == 0;
}

}  // namespace

template <typename T>
cudaError_t launch_denoise_step(const DenoiseStepParams<T>& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const bool vector_ok = aligned4(p.sample) && aligned4(p.model_output) && aligned4(p.model_output_cond) &&
                         aligned4(p.derivative) && aligned4(p.noise) && aligned4(p.out) &&
                         aligned4(p.pred_original);
  constexpr int kThreads = 256;
  const int64_t num_groups = (p.numel + 3) / 4;
  int device = 0, num_sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  // Enough blocks to fill the machine several times over; the loop strides over the rest.
  const int64_t max_blocks = static_cast<int64_t>(num_sms > 0 ? num_sms : 132) * 16;
  const int64_t wanted = (num_groups + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < max_blocks ? wanted : max_blocks);
  if (p.noise_source == NoiseSource::kPhilox) {
    denoise_step_kernel<T, true><<<blocks, kThreads, 0, stream>>>(p, vector_ok);
  } else {
    denoise_step_kernel<T, false><<<blocks, kThreads, 0, stream>>>(p, vector_ok);
  }
  return cudaGetLastError();
}

template cudaError_t launch_denoise_step<float>(const DenoiseStepParams<float>&, cudaStream_t);
template cudaError_t launch_denoise_step<__half>(const DenoiseStepParams<__half>&, cudaStream_t);
template cudaError_t launch_denoise_step<__nv_bfloat16>(const DenoiseStepParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace genfast
