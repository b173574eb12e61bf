// What the Hopper attention kernels (attention_forward_sm90.cu, attention_backward_sm90.cu) share:
// a CTA of two warpgroups, tiles in 128-byte-swizzled shared memory (attention_swizzle.cuh), and the
// two products every step is made of, for one warpgroup's 64 rows:
//   wgmma_abt: acc (64 x N) = A B^T, A and B K-major tiles of kD columns (over kD / 16 k-steps)
//   wgmma_ab:  acc (64 x kD) += A B, A in registers (kK / 16 k-steps of mma's A fragments), B an
//              MN-major tile of kK rows
// Both wait for their wgmma before returning; their _async forms do not. Every k-step and half runs
// (zero-padded columns add nothing), and no branch may come between a wgmma and the wait that covers
// it (ptxas then serializes every wgmma of the kernel).
// WarpgroupTurns has the two warpgroups take turns issuing products.
#pragma once

#include "attention.cuh"
#include "attention_swizzle.cuh"
#include "attention_tile.cuh"
#ifndef GENFAST_EMULATED_CUDA
#include "attention_sm90.cuh"
#endif

namespace genfast {
namespace attention_cuda {

constexpr int kHopperThreads = 256;  // two warpgroups
// The warp-specialized kernels' third warpgroup, which loads with TMA on a few registers and hands
// the rest to the two consumer warpgroups (setmaxnreg, in multiples of 8).
constexpr int kProducerThreads = 128;
// The registers each of their threads starts with: __launch_bounds__(all threads, 1) caps ptxas at
// the SM's 64K over the threads, in multiples of 8 (168 for 384 threads), and ptxas takes the cap.
constexpr int kWarpSpecializedEntryRegisters = 64 * 1024 / (kHopperThreads + kProducerThreads) / 8 * 8;
// setmaxnreg.inc takes registers only from the CTA's own pool, which holds what setmaxnreg.dec put
// there: the consumers' increase must come out of the producer's decrease, or they wait for ever
// (the SM's registers left over at launch are not in the pool).
constexpr bool registers_fit(int producer, int consumer, int entry = kWarpSpecializedEntryRegisters) {
  return producer % 8 == 0 && consumer % 8 == 0 && producer <= entry && consumer >= entry &&
         kHopperThreads * (consumer - entry) <= kProducerThreads * (entry - producer);
}
static_assert(registers_fit(24, 240) && !registers_fit(32, 240) && registers_fit(32, 232),
              "the pool's balance at 168 registers a thread");
#ifndef GENFAST_EMULATED_CUDA
// Whether ptxas gave a warp-specialized kernel the entry registers its producer's and consumers'
// counts fit (registers_fit); the launchers ask once per kernel and take the cp.async kernel if not.
template <typename... KernelArgs>
bool starts_with_registers_that_fit(void (*kernel)(KernelArgs...), int producer, int consumer) {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
         registers_fit(producer, consumer, attributes.numRegs);
}
#else
template <typename... KernelArgs>
bool starts_with_registers_that_fit(void (*)(KernelArgs...), int, int) {
  return true;  // the emulator's threads share no register file
}
#endif

// Whether a call may run on the Hopper kernels: an sm_90 device, a build with sm_90a
// (GENFAST_ATTENTION_SM90) and GENFAST_ATTENTION_SM90=1 in the environment
// (attention_forward_sm90.cu); the head dims of their buckets (64, 128 and 256), where the build has them.
bool hopper_opted_in();
constexpr int kHopperMaxHeadDim = (GENFAST_ATTENTION_BUCKETS & 8) != 0   ? 256
                                  : (GENFAST_ATTENTION_BUCKETS & 4) != 0 ? 128
                                  : (GENFAST_ATTENTION_BUCKETS & 2) != 0 ? 64
                                                                         : 0;
inline int widest_head_dim(const AttentionParams& p) { return static_cast<int>(p.dim > p.v_dim ? p.dim : p.v_dim); }
// The forward's also needs a plan without stacked heads, split keys or float32 o, and keys not paged
// (its key blocks of 80 at head dim 256 would cross pages; paged calls take the sm_80 kernels).
inline bool hopper_forward_applies(const AttentionParams& p, const AttentionForwardPlan& plan) {
  return plan.heads_per_cta == 1 && plan.splits == 1 && !plan.float_o && widest_head_dim(p) <= kHopperMaxHeadDim &&
         p.block_table == nullptr && hopper_opted_in();
}
inline bool hopper_backward_applies(const AttentionParams& p) {
  return widest_head_dim(p) <= kHopperMaxHeadDim && hopper_opted_in();
}
template <typename T>
cudaError_t run_forward_sm90(const AttentionCudaParams<T>& params, unsigned vector, cudaStream_t stream);
template <typename T>
cudaError_t run_backward_sm90(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                              unsigned vector, cudaStream_t stream);

// Whether TMA can address a tensor of sizes (batch, heads, positions) with element strides `stride`
// in the same order: 16-byte aligned base, strides positive multiples of 16 bytes (a dim of size 1
// may have any stride).
inline bool tma_addressable(const void* base, const int64_t (&stride)[3], const int64_t (&sizes)[3]) {
  bool ok = reinterpret_cast<uintptr_t>(base) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (sizes[d] == 1 || (stride[d] > 0 && stride[d] % 8 == 0));
  return ok;
}

// The map of a dense (batch, heads, positions, width) tensor with element strides `stride`, in
// boxes of 64 columns by `rows` positions (zeros past each dim's end).
inline cudaError_t tile_map(CUtensorMap* map, const void* base, const int64_t (&stride)[3], int64_t batch,
                            int64_t heads, int64_t positions, int64_t width, uint32_t rows) {
  const uint64_t dims[4] = {static_cast<uint64_t>(width), static_cast<uint64_t>(positions),
                            static_cast<uint64_t>(heads), static_cast<uint64_t>(batch)};
  const int64_t sizes[3] = {positions, heads, batch};
  uint64_t strides[3];
  for (int d = 0; d < 3; ++d) strides[d] = sizes[d] == 1 ? 16 : static_cast<uint64_t>(stride[2 - d]) * 2;
  return encode_tile_map(map, base, dims, strides, 64, rows);
}

// The first 1024-byte-aligned byte of a CTA's dynamic shared memory (kSwizzleAtomBytes more are
// requested), and its shared address.
__device__ __forceinline__ char* swizzle_aligned(uint4* raw, uint32_t& address) {
  const uint32_t start = smem_address(raw);
  address = (start + kSwizzleAtomBytes - 1) & ~(kSwizzleAtomBytes - 1);
  return reinterpret_cast<char*>(raw) + (address - start);
}

// Before a step of a loop whose blocks cp.async stages in two buffers: stage_block, with the fence
// that makes the copies (and the zero stores of the loads) visible to wgmma's async proxy. Returns
// whether the mask shows any element of the block (shown(), mask_shows_any; kAlways: true).
template <bool kAlways, typename LoadNext, typename Shown>
__device__ __forceinline__ bool wait_for_shown_stage(bool has_next, const LoadNext& load_next, const Shown& shown) {
  return stage_block<kAlways>(has_next, load_next, shown, [] { fence_async_shared(); });
}
template <typename LoadNext>
__device__ __forceinline__ void wait_for_stage(bool has_next, const LoadNext& load_next) {
  wait_for_shown_stage<true>(has_next, load_next, [] { return true; });
}

// Columns first .. first + 63 (8 n-tiles) of an accumulator.
template <int kTiles>
__device__ __forceinline__ float (&columns_of(float (&acc)[kTiles][4], int first))[8][4] {
  return *reinterpret_cast<float(*)[8][4]>(&acc[first]);
}

// acc = A B^T: A the warpgroup's 64 rows at shared address a (a tile of a_rows rows: its 64-column
// halves a_rows * 128 bytes apart), B the N = 8 kTiles rows of a tile of b_rows rows at b. The
// _async form issues it as one committed wgmma group and returns: acc belongs to the product until a
// wgmma_wait covers the group, after which pin_registers(acc) orders the reads that follow.
template <typename T, int kD, int kTiles>
__device__ __forceinline__ void wgmma_abt_async(float (&acc)[kTiles][4], uint32_t a, int a_rows, uint32_t b,
                                                int b_rows) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    const uint32_t within = (ks % 4) * 32;  // k-step ks reads 32 bytes into each row of its half
    wgmma_ss<T>(acc, smem_descriptor(a + (ks / 4) * a_rows * 128 + within),
                smem_descriptor(b + (ks / 4) * b_rows * 128 + within), ks > 0);
  }
  wgmma_commit();
}
template <typename T, int kD, int kTiles>
__device__ __forceinline__ void wgmma_abt(float (&acc)[kTiles][4], uint32_t a, int a_rows, uint32_t b, int b_rows) {
  wgmma_abt_async<T, kD>(acc, a, a_rows, b, b_rows);
  wgmma_wait<0>();
  pin_registers(acc);
}

// acc += A B: A's k-step kk in a[kk], B the tile of b_rows rows at b read MN-major (k-step kk: its
// rows 16 kk .., two swizzle atoms; each 64-column half of acc is one product). The _async form as
// above; a stays the product's too (pin_registers(a) after the wait, so that nothing reuses its
// registers while the wgmma reads them).
template <typename T, int kD, int kSteps>
__device__ __forceinline__ void wgmma_ab_async(float (&acc)[kD / 8][4], uint32_t (&a)[kSteps][4], uint32_t b,
                                               int b_rows) {
  pin_registers(acc);
  pin_registers(a);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
#pragma unroll
    for (int half = 0; half < kD / 64; ++half) {
      wgmma_rs<T>(columns_of(acc, half * 8), a[kk],
                  smem_descriptor(b + half * b_rows * 128 + kk * 2 * kSwizzleAtomBytes));
    }
  }
  wgmma_commit();
}
template <typename T, int kD, int kSteps>
__device__ __forceinline__ void wgmma_ab(float (&acc)[kD / 8][4], uint32_t (&a)[kSteps][4], uint32_t b, int b_rows) {
  wgmma_ab_async<T, kD>(acc, a, b, b_rows);
  wgmma_wait<0>();
  pin_registers(acc);
}

// The named barriers on which the warp-specialized kernels' warpgroups OR their mask reads:
// kShownBarrier + group (WarpgroupTurns takes 1 and 2, the backward's dS 1).
constexpr int kShownBarrier = 3;

// Whether the mask shows warpgroup `group` any element of its kRows x kCols block: each of its
// threads (`thread`, 0 to 127) reads its share (mask_shows_any), ORed on the group's named barrier.
// `busy`: whether the warpgroup has a query and a key in the block at all, the answer when the call
// has no mask (`masked` false) and otherwise implied by `row` and `k_len`. Call it with no product
// in flight (C7518).
template <int kRows, int kCols, typename RowFn>
__device__ __forceinline__ bool warpgroup_sees_block(const AttentionParams& p, bool masked, bool busy, int group,
                                                     int64_t b, int j0, int k_len, RowFn row, int thread) {
  if (!masked) return busy;
  const bool mine = mask_shows_any<kRows, kCols, kHopperThreads / 2>(p, b, j0, k_len, row, thread);
  return named_barrier_or(kShownBarrier + group, kHopperThreads / 2, mine);
}

// FlashAttention-3's pingpong: the two consumer warpgroups take turns issuing their products, so
// that one's softmax runs while the other's products have the tensor cores. Warpgroup g issues
// between begin() and end(), once named barrier kFirstBarrier + g has the other's arrival; group 0
// goes first, and finish() takes group 1's last arrival, so no barrier is left part-way.
struct WarpgroupTurns {
  static constexpr int kFirstBarrier = 1, kThreads = kHopperThreads;
  int group;
  __device__ __forceinline__ explicit WarpgroupTurns(int g) : group(g) {
    if (group == 1) named_barrier_arrive(kFirstBarrier, kThreads);
  }
  __device__ __forceinline__ void begin() const { named_barrier_sync(kFirstBarrier + group, kThreads); }
  __device__ __forceinline__ void end() const { named_barrier_arrive(kFirstBarrier + (group ^ 1), kThreads); }
  __device__ __forceinline__ void finish() const {
    if (group == 0) named_barrier_sync(kFirstBarrier, kThreads);
  }
};

// The A fragments of all k-steps of a product from a 64-row accumulator of 8 kSteps columns.
template <typename T, int kSteps>
__device__ __forceinline__ void fragments_of(uint32_t (&a)[kSteps][4], const float (&acc)[2 * kSteps][4]) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) a_from_c<T, 2 * kSteps>(a[kk], acc, kk);
}

}  // namespace attention_cuda
}  // namespace genfast
