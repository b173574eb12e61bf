// The hardware side of the attention kernels (attention_tile.cuh includes it): PTX wrappers for
// cp.async, ldmatrix and mma.sync m16n8k16, the device's compute capability, and the launch.
// kernels/tests/cuda_emulator.h defines the same names on the host.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace genfast {
namespace attention_cuda {

// cp.async and mma.m16n8k16 need sm_80. Built for an older architecture (in a fat binary beside
// sm_80 and later), the wrappers trap instead, and the launchers refuse such a device first.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define GENFAST_SM80_ASM(...) __trap()
#else
#define GENFAST_SM80_ASM(...) asm volatile(__VA_ARGS__)
#endif

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes from global to shared memory, asynchronously (both 16-byte aligned).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
  GENFAST_SM80_ASM("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { GENFAST_SM80_ASM("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  GENFAST_SM80_ASM("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t* p) {
  GENFAST_SM80_ASM("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(smem_address(p))
                   : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  GENFAST_SM80_ASM("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(smem_address(p))
                   : "memory");
}

// c += a b for one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  GENFAST_SM80_ASM(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                          uint32_t b1) {
  GENFAST_SM80_ASM(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#undef GENFAST_SM80_ASM

// *p += v in global memory, atomically (a reduction: nothing is returned).
__device__ __forceinline__ void atomic_add_f32(float* p, float v) { atomicAdd(p, v); }
// p[0] += lo and p[1] += hi, p 8-byte aligned: one vector reduction on sm_90 and later.
__device__ __forceinline__ void atomic_add_f32x2(float* p, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(lo, hi));
#else
  atomicAdd(p, lo);
  atomicAdd(p + 1, hi);
#endif
}

// The compute capability of the current device.
inline cudaError_t current_device_capability(int* major, int* minor) {
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  return status == cudaSuccess ? cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, device) : status;
}

// kernel<<<grid, threads, smem_bytes, stream>>>(args...) with smem_bytes of dynamic shared memory.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_tiles(void (*kernel)(KernelArgs...), int64_t grid, int threads, int smem_bytes, cudaStream_t stream,
                         const Args&... args) {
  if (grid == 0) return cudaSuccess;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (status != cudaSuccess) return status;
  kernel<<<static_cast<unsigned>(grid), threads, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace attention_cuda
}  // namespace genfast
