// The hardware side of the Hopper attention forward (attention_forward_sm90.cu): wgmma (warpgroup
// MMA, sm_90a) on operands described by attention_swizzle.cuh, its fences, and the proxy fence that
// makes cp.async's writes visible to it. kernels/tests/cuda_emulator.h defines the same names on the
// host.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace genfast {
namespace attention_cuda {

// wgmma exists only in the sm_90a target; elsewhere (sm_80, sm_90 without the feature set, in a fat
// binary) these trap, and the launcher never picks the Hopper kernel there.
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GENFAST_SM90_ASM(...) __trap()
#else
#define GENFAST_SM90_ASM(...) asm volatile(__VA_ARGS__)
#endif

// Orders this warpgroup's earlier register writes (accumulators, A fragments) before its next wgmma.
__device__ __forceinline__ void wgmma_fence() { GENFAST_SM90_ASM("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { GENFAST_SM90_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N of this warpgroup's committed wgmma groups are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  GENFAST_SM90_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy writes to shared memory (stores, landed cp.async) visible to
// the async proxy that wgmma reads through; a barrier must follow before another thread's wgmma.
__device__ __forceinline__ void fence_async_shared() {
  GENFAST_SM90_ASM("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accesses of an accumulator across a wgmma that is in flight.
template <int kTiles>
__device__ __forceinline__ void pin_registers(float (&d)[kTiles][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[t][e])::"memory");
  }
}

// d (the warpgroup's 64 rows x 128 columns, fragments as mma.m16n8's C tiles: warp w of the group
// holds rows 16 w ..) += A B for one k-step of 16: A (64 x 16) K-major and B (16 x 128) K-major,
// both from descriptors.
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b);

// d (64 x 64) += A B for one k-step of 16: A in registers (mma.m16n8k16's A fragment of each warp's
// 16 rows), B (16 x 64) MN-major (transposed) from a descriptor.
template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b);

// The accumulator operands of 8 n-tiles, and the two specializations of each product for a T and
// its PTX type name.
#define GENFAST_WGMMA_D8(t)  /* the accumulators of n-tiles t .. t + 7 */                                             \
  "+f"(d[(t) + 0][0]), "+f"(d[(t) + 0][1]), "+f"(d[(t) + 0][2]), "+f"(d[(t) + 0][3]),                                 \
  "+f"(d[(t) + 1][0]), "+f"(d[(t) + 1][1]), "+f"(d[(t) + 1][2]), "+f"(d[(t) + 1][3]),                                 \
  "+f"(d[(t) + 2][0]), "+f"(d[(t) + 2][1]), "+f"(d[(t) + 2][2]), "+f"(d[(t) + 2][3]),                                 \
  "+f"(d[(t) + 3][0]), "+f"(d[(t) + 3][1]), "+f"(d[(t) + 3][2]), "+f"(d[(t) + 3][3]),                                 \
  "+f"(d[(t) + 4][0]), "+f"(d[(t) + 4][1]), "+f"(d[(t) + 4][2]), "+f"(d[(t) + 4][3]),                                 \
  "+f"(d[(t) + 5][0]), "+f"(d[(t) + 5][1]), "+f"(d[(t) + 5][2]), "+f"(d[(t) + 5][3]),                                 \
  "+f"(d[(t) + 6][0]), "+f"(d[(t) + 6][1]), "+f"(d[(t) + 6][2]), "+f"(d[(t) + 6][3]),                                 \
  "+f"(d[(t) + 7][0]), "+f"(d[(t) + 7][1]), "+f"(d[(t) + 7][2]), "+f"(d[(t) + 7][3])
#define GENFAST_WGMMA(T, TYPE)                                                                                        \
  template <>                                                                                                         \
  __device__ __forceinline__ void wgmma_ss<T>(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {                  \
    GENFAST_SM90_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                     \
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                                 \
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                        \
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "               \
                     "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "               \
                     "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "              \
                     "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                                  \
                     : GENFAST_WGMMA_D8(0), GENFAST_WGMMA_D8(8)                                                       \
                     : "l"(desc_a), "l"(desc_b), "n"(1));                                                             \
  }                                                                                                                   \
  template <>                                                                                                         \
  __device__ __forceinline__ void wgmma_rs<T>(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {            \
    GENFAST_SM90_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                     \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                                  \
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                        \
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "              \
                     "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                    \
                     : GENFAST_WGMMA_D8(0)                                                                            \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1));                              \
  }
GENFAST_WGMMA(__half, "f16")
GENFAST_WGMMA(__nv_bfloat16, "bf16")
#undef GENFAST_WGMMA
#undef GENFAST_WGMMA_D8

#undef GENFAST_SM90_ASM

}  // namespace attention_cuda
}  // namespace genfast
