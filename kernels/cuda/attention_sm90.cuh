// The hardware side of the Hopper attention forward (attention_forward_sm90.cu): wgmma (warpgroup
// MMA, sm_90a) on operands described by attention_swizzle.cuh, its fences, and the proxy fence that
// makes cp.async's writes visible to it; mbarriers, TMA tile loads and their tensor maps, named
// barriers and setmaxnreg for the warp-specialized kernel. kernels/tests/cuda_emulator.h defines the
// same names on the host.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
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
// mbarriers in shared memory: a phase ends when `count` threads have arrived and the transaction
// bytes announced with expect_tx have landed; a wait names the parity of the phase it waits out.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  GENFAST_SM90_ASM("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count) : "memory");
}
// Makes initialized mbarriers visible to the async proxy (TMA); a barrier must follow.
__device__ __forceinline__ void fence_barrier_init() {
  GENFAST_SM90_ASM("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  GENFAST_SM90_ASM("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  GENFAST_SM90_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes)
                   : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    GENFAST_SM90_ASM(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
  } while (done == 0);
}
// A box of a 4-d tensor map at coordinates (c0 innermost) into shared memory; its bytes complete
// on `bar`.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  GENFAST_SM90_ASM(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_address(bar))
      : "memory");
}
// Named barrier `id` (1 .. 15; 0 is __syncthreads') of `count` threads, whole warps: sync waits until
// `count` have arrived, arrive counts this warp without waiting.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// sync that also returns whether any of the `count` threads' predicates held (__syncthreads_or for
// part of a CTA).
__device__ __forceinline__ bool named_barrier_or(int id, int count, bool predicate) {
  uint32_t any;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, %2, %3, p;\n selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(any)
      : "r"(static_cast<uint32_t>(predicate)), "r"(id), "r"(count)
      : "memory");
  return any != 0;
}
// Moves this warpgroup's register budget (the producer gives, the consumers take).
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_inc() {
  GENFAST_SM90_ASM("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_dec() {
  GENFAST_SM90_ASM("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// The tensor map of a 4-d tensor of 16-bit values (dims innermost first; byte strides of dims 1 .. 3,
// multiples of 16; base 16-byte aligned) read in boxes of box0 x box1 x 1 x 1 with the 128-byte
// swizzle and zeros out of bounds. cuTensorMapEncodeTiled comes from the driver through the runtime,
// so the extension does not link libcuda.
inline cudaError_t encode_tile_map(CUtensorMap* map, const void* base, const uint64_t (&dims)[4],
                                   const uint64_t (&strides)[3], uint32_t box0, uint32_t box1) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    // The versioned call from CUDA 13 (the other is deprecated there); a 12.x build may load an older
    // runtime (torch's own) that lacks it.
#if CUDART_VERSION >= 13000
    const cudaError_t status =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t status = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    return status == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<Encode>(fn) : nullptr;
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t global_dims[4] = {dims[0], dims[1], dims[2], dims[3]};
  const cuuint64_t global_strides[3] = {strides[0], strides[1], strides[2]};
  const cuuint32_t box[4] = {box0, box1, 1, 1}, element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), global_dims,
                                 global_strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Keeps the compiler from moving accesses of an accumulator or A fragment across a wgmma fence or
// a wgmma in flight.
template <int kTiles>
__device__ __forceinline__ void pin_registers(float (&d)[kTiles][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[t][e])::"memory");
  }
}
template <int kTiles>
__device__ __forceinline__ void pin_registers(uint32_t (&a)[kTiles][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[t][e])::"memory");
  }
}

// d (the warpgroup's 64 rows x 128 columns, fragments as mma.m16n8's C tiles: warp w of the group
// holds rows 16 w ..) = A B + (accumulate ? d : 0) for one k-step of 16: A (64 x 16) K-major and
// B (16 x 128) K-major, both from descriptors. Without accumulate, d's registers are only written
// (no zeros to copy into them, which ptxas would order after an earlier wgmma still in flight).
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, bool accumulate);
// The same with 80, 64 and 32 columns (m64n80k16, m64n64k16, m64n32k16).
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[10][4], uint64_t desc_a, uint64_t desc_b, bool accumulate);
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate);
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[4][4], uint64_t desc_a, uint64_t desc_b, bool accumulate);

// d (64 x 64) += A B for one k-step of 16: A in registers (mma.m16n8k16's A fragment of each warp's
// 16 rows), B (16 x 64) MN-major (transposed) from a descriptor.
template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b);

// The accumulator operands of 8 n-tiles (constraint C: "+f" read and written, "=f" only written),
// the m64nNk16 products from two descriptors (N = 128, 80, 64; SCALE_D 0 ignores d's old values), and
// the specializations of each product for a T and its PTX type name.
#define GENFAST_WGMMA_D8(C, t) /* the accumulators of n-tiles t .. t + 7 */                                          \
  C(d[(t) + 0][0]), C(d[(t) + 0][1]), C(d[(t) + 0][2]), C(d[(t) + 0][3]), C(d[(t) + 1][0]), C(d[(t) + 1][1]),         \
      C(d[(t) + 1][2]), C(d[(t) + 1][3]), C(d[(t) + 2][0]), C(d[(t) + 2][1]), C(d[(t) + 2][2]), C(d[(t) + 2][3]),     \
      C(d[(t) + 3][0]), C(d[(t) + 3][1]), C(d[(t) + 3][2]), C(d[(t) + 3][3]), C(d[(t) + 4][0]), C(d[(t) + 4][1]),     \
      C(d[(t) + 4][2]), C(d[(t) + 4][3]), C(d[(t) + 5][0]), C(d[(t) + 5][1]), C(d[(t) + 5][2]), C(d[(t) + 5][3]),     \
      C(d[(t) + 6][0]), C(d[(t) + 6][1]), C(d[(t) + 6][2]), C(d[(t) + 6][3]), C(d[(t) + 7][0]), C(d[(t) + 7][1]),     \
      C(d[(t) + 7][2]), C(d[(t) + 7][3])
#define GENFAST_WGMMA_SS128(TYPE, C, SCALE_D)                                                                         \
  GENFAST_SM90_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                       \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                                   \
                   "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                          \
                   "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                 \
                   "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                 \
                   "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                \
                   "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                                    \
                   : GENFAST_WGMMA_D8(C, 0), GENFAST_WGMMA_D8(C, 8)                                                   \
                   : "l"(desc_a), "l"(desc_b), "n"(SCALE_D))
#define GENFAST_WGMMA_SS80(TYPE, C, SCALE_D)                                                                          \
  GENFAST_SM90_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %42, 0;\n"                                                       \
                   "wgmma.mma_async.sync.aligned.m64n80k16.f32." TYPE "." TYPE " "                                    \
                   "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                          \
                   "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                 \
                   "%32, %33, %34, %35, %36, %37, %38, %39}, "                                                        \
                   "%40, %41, p, 1, 1, 0, 0;\n}\n"                                                                    \
                   : GENFAST_WGMMA_D8(C, 0), C(d[8][0]), C(d[8][1]), C(d[8][2]), C(d[8][3]), C(d[9][0]),              \
                     C(d[9][1]), C(d[9][2]), C(d[9][3])                                                               \
                   : "l"(desc_a), "l"(desc_b), "n"(SCALE_D))
#define GENFAST_WGMMA_SS64(TYPE, C, SCALE_D)                                                                          \
  GENFAST_SM90_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                       \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                                    \
                   "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                          \
                   "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                \
                   "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                                    \
                   : GENFAST_WGMMA_D8(C, 0)                                                                           \
                   : "l"(desc_a), "l"(desc_b), "n"(SCALE_D))
#define GENFAST_WGMMA_SS32(TYPE, C, SCALE_D)                                                                          \
  GENFAST_SM90_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                       \
                   "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " "                                    \
                   "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "                         \
                   "%16, %17, p, 1, 1, 0, 0;\n}\n"                                                                    \
                   : C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), C(d[1][0]), C(d[1][1]), C(d[1][2]),              \
                     C(d[1][3]), C(d[2][0]), C(d[2][1]), C(d[2][2]), C(d[2][3]), C(d[3][0]), C(d[3][1]),              \
                     C(d[3][2]), C(d[3][3])                                                                           \
                   : "l"(desc_a), "l"(desc_b), "n"(SCALE_D))
// The product SS with accumulate chosen at run time (a constant wherever the k-step loop unrolls).
#define GENFAST_WGMMA_SS(SS, TYPE) \
  do {                             \
    if (accumulate) {              \
      SS(TYPE, "+f", 1);           \
    } else {                       \
      SS(TYPE, "=f", 0);           \
    }                              \
  } while (0)
#define GENFAST_WGMMA(T, TYPE)                                                                                        \
  template <>                                                                                                         \
  __device__ __forceinline__ void wgmma_ss<T>(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) { \
    GENFAST_WGMMA_SS(GENFAST_WGMMA_SS128, TYPE);                                                                      \
  }                                                                                                                   \
  template <>                                                                                                         \
  __device__ __forceinline__ void wgmma_ss<T>(float (&d)[10][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) { \
    GENFAST_WGMMA_SS(GENFAST_WGMMA_SS80, TYPE);                                                                       \
  }                                                                                                                   \
  template <>                                                                                                         \
  __device__ __forceinline__ void wgmma_ss<T>(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {  \
    GENFAST_WGMMA_SS(GENFAST_WGMMA_SS64, TYPE);                                                                       \
  }                                                                                                                   \
  template <>                                                                                                         \
  __device__ __forceinline__ void wgmma_ss<T>(float (&d)[4][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {  \
    GENFAST_WGMMA_SS(GENFAST_WGMMA_SS32, TYPE);                                                                       \
  }                                                                                                                   \
  template <>                                                                                                         \
  __device__ __forceinline__ void wgmma_rs<T>(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {            \
    GENFAST_SM90_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                     \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                                  \
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                        \
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "              \
                     "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                    \
                     : GENFAST_WGMMA_D8("+f", 0)                                                                      \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1));                              \
  }
GENFAST_WGMMA(__half, "f16")
GENFAST_WGMMA(__nv_bfloat16, "bf16")
#undef GENFAST_WGMMA
#undef GENFAST_WGMMA_SS
#undef GENFAST_WGMMA_SS64
#undef GENFAST_WGMMA_SS32
#undef GENFAST_WGMMA_SS80
#undef GENFAST_WGMMA_SS128
#undef GENFAST_WGMMA_D8

#undef GENFAST_SM90_ASM

}  // namespace attention_cuda
}  // namespace genfast
