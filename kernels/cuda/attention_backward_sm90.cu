// Attention backward for Hopper (sm_90a) on wgmma: attention_backward.cu's two kernels with two
// warpgroups, tiles in 128-byte-swizzled shared memory, and the products of attention_hopper.cuh:
//  (1) attention_backward_kv_sm90_kernel: 128 keys per CTA (64 per warpgroup), over the query heads
//      of its kv head and the query blocks of 64 its band reaches:
//        S^T = K Q^T,  dP^T = V dO^T  (wgmma_abt, N = 64 queries)
//        dV += P_drop^T dO,  dK += dS^T Q  (wgmma_ab, B = dO or Q read MN-major)
//      Dense inputs that TMA can address take its warp-specialized form (a producer warpgroup
//      loading with TMA into two stages behind mbarriers), others copy with cp.async. With
//      grads.dq_accum either also adds dQ += dS K with atomics (dS through shared memory, A
//      fragments by ldmatrix, K read MN-major; hopper_add_dq) and leaves (2) to a cast, except the
//      cp.async kernel's non-plain d128 variant, which stays deterministic (it would spill more).
//  (2) attention_backward_q_sm90_kernel: 128 queries of one head per CTA, over key blocks of 64:
//        S = Q K^T,  dP = dO V^T,  dQ += dS K  (B = K read MN-major); and dS to grad_s when asked.
// Head dim 256 takes a pair of their own (attention_backward_kv_sm90_d256_kernel and
// attention_backward_q_sm90_d256_kernel), whose warpgroups split the accumulators' columns.
// The cp.async kernels skip a step whose block the mask hides whole (wait_for_shown_stage; not the
// d128 kv kernel, kCpAsyncKvSkipsHidden), and the warp-specialized kv kernel's warpgroups each step
// whose queries the mask hides their 64 keys from. Each pair of products above is issued together,
// then waited for. The per-element work (P from lse, dropout replayed, dS) is backward_element, as
// on sm_80. The launcher in attention_backward.cu takes these on sm_90 when GENFAST_ATTENTION_SM90=1
// and the build has sm_90a (hopper_backward_applies).
#include "attention.cuh"
#include "attention_hopper.cuh"

namespace genfast {
namespace attention_cuda {
namespace {

template <int kD>
struct HopperKvTile {
  // Keys per CTA (64 at head dim 256, where dK and dV of 128 keys would not fit the registers),
  // queries per step.
  static constexpr int kBlockN = kD == 256 ? 64 : 128, kBlockM = 64;
  static constexpr int kKeyElements = kBlockN * kD, kQueryElements = kBlockM * kD;
  // K and V, Q and dO double-buffered (swizzled), then lse and delta double-buffered.
  static constexpr int kSmemBytes =
      static_cast<int>(kSwizzleAtomBytes) + (2 * kKeyElements + 4 * kQueryElements) * 2 + 4 * kBlockM * 4;
  static_assert(kSmemBytes <= 227 * 1024, "the kv kernel's tiles must fit an sm_90 CTA");
};

template <int kD>
struct HopperQTile {
  static constexpr int kBlockM = 128, kBlockN = 64;  // queries per CTA, keys per step
  static constexpr int kQueryElements = kBlockM * kD, kKeyElements = kBlockN * kD;
  // Q and dO, then K and V double-buffered (swizzled).
  static constexpr int kSmemBytes = static_cast<int>(kSwizzleAtomBytes) + (2 * kQueryElements + 4 * kKeyElements) * 2;
  static_assert(kSmemBytes <= 227 * 1024, "the q kernel's tiles must fit an sm_90 CTA");
};

// The kv kernels' dS, for dQ with atomics: 64 x 128 tiles of [query][key] with padded rows (ldmatrix
// reads them as A fragments without bank conflicts); two stages in the warp-specialized kernel, one
// in the cp.async kernel.
constexpr int kDsStride = 128 + 8;
constexpr int kDsStageElements = 64 * kDsStride;

// Whether the cp.async kv kernel adds dQ with atomics (when asked); the non-plain d128 variant would
// spill more (256 bytes instead of 172), and stays deterministic.
template <int kD, bool kPlain>
constexpr bool kCpAsyncAtomicDq = kPlain || kD <= 64;

// The cp.async kernels' mask reads in flight at a time (mask_shows_any): all of a block's would
// spill 164 to 296 bytes in the q kernels.
constexpr int kCpAsyncMaskLoads = 4;

// Whether the cp.async kv kernel skips a step whose queries the mask hides all the CTA's keys from
// (wait_for_shown_stage); the d128 variant would spill more (284 bytes instead of 212), and
// computes such steps under the mask.
template <int kD>
constexpr bool kCpAsyncKvSkipsHidden = kD != 128;

// The cp.async kv kernel's shared memory: HopperKvSmem's tiles, then one stage of dS.
template <int kD>
struct HopperKvCpAsyncTile : HopperKvTile<kD> {
  static constexpr int kSmemBytes = HopperKvTile<kD>::kSmemBytes + kDsStageElements * 2;
  static_assert(kSmemBytes <= 227 * 1024, "the kv kernel's tiles and dS must fit an sm_90 CTA");
};

// The kv kernels' tiles in their dynamic shared memory, 1024-byte aligned: K, V, then Q, dO, lse
// and delta in two stages; `end` is past them (the warp-specialized kernel's mbarriers).
template <int kD>
struct HopperKvSmem {
  using Tile = HopperKvTile<kD>;
  uint16_t *k, *v, *q, *grad_o;
  float *lse, *delta;
  uint32_t k_address, v_address, q_address, grad_o_address;
  void* end;
  __device__ __forceinline__ explicit HopperKvSmem(uint4* raw) {
    k = reinterpret_cast<uint16_t*>(swizzle_aligned(raw, k_address));
    v = k + Tile::kKeyElements;
    q = v + Tile::kKeyElements;
    grad_o = q + 2 * Tile::kQueryElements;
    lse = reinterpret_cast<float*>(grad_o + 2 * Tile::kQueryElements);
    delta = lse + 2 * Tile::kBlockM;
    end = delta + 2 * Tile::kBlockM;
    v_address = k_address + Tile::kKeyElements * 2;
    q_address = v_address + Tile::kKeyElements * 2;
    grad_o_address = q_address + 2 * Tile::kQueryElements * 2;
  }
  __device__ __forceinline__ uint32_t q_tile(int s) const { return q_address + s * Tile::kQueryElements * 2; }
  __device__ __forceinline__ uint32_t grad_o_tile(int s) const {
    return grad_o_address + s * Tile::kQueryElements * 2;
  }
};

// The cp.async kv kernels' copies (the caller commits them): K and V of the CTA's keys, and step
// `step`'s Q, dO (and, by plain stores, lse and delta) into stage `buf`.
template <int kD, typename T>
__device__ __forceinline__ void load_key_tiles(const AttentionCudaParams<T>& params,
                                               const KeyBlockWork<HopperKvTile<kD>::kBlockN,
                                                                  HopperKvTile<kD>::kBlockM>& work,
                                               const HopperKvSmem<kD>& smem, unsigned vector) {
  constexpr int kBlockN = HopperKvTile<kD>::kBlockN;
  const AttentionParams& p = params.base;
  const AttentionSequence& seq = work.seq;
  const uint16_t* k = reinterpret_cast<const uint16_t*>(params.k) + attention_k_at(p, seq, work.b, work.hk, work.j0);
  const uint16_t* v = reinterpret_cast<const uint16_t*>(params.v) + attention_v_at(p, seq, work.b, work.hk, work.j0);
  load_tile<kBlockN, kD, kHopperThreads>(smem.k, k, p.k_stride[2], work.cols, static_cast<int>(p.dim),
                                         (vector & kVectorK) != 0, SwizzledRows<kBlockN>{});
  load_tile<kBlockN, kD, kHopperThreads>(smem.v, v, p.v_stride[2], work.cols, static_cast<int>(p.v_dim),
                                         (vector & kVectorV) != 0, SwizzledRows<kBlockN>{});
}
template <int kD, typename T>
__device__ __forceinline__ void load_query_stage(const AttentionCudaParams<T>& params,
                                                 const AttentionCudaGrads<T>& grads,
                                                 const KeyBlockWork<HopperKvTile<kD>::kBlockN,
                                                                    HopperKvTile<kD>::kBlockM>& work,
                                                 const HopperKvSmem<kD>& smem, int step, int buf, unsigned vector) {
  using Tile = HopperKvTile<kD>;
  constexpr int kBlockM = Tile::kBlockM;
  const AttentionParams& p = params.base;
  const AttentionSequence& seq = work.seq;
  const int64_t h = work.head(step);
  const int i0 = work.i0(step), valid = min(kBlockM, work.q_len - i0);
  const uint16_t* q = reinterpret_cast<const uint16_t*>(params.q) + attention_q_at(p, seq, work.b, h, i0);
  const uint16_t* grad_o = reinterpret_cast<const uint16_t*>(grads.grad_o) + seq.out_row(h, i0) * p.v_dim;
  load_tile<kBlockM, kD, kHopperThreads>(smem.q + buf * Tile::kQueryElements, q, p.q_stride[2], valid,
                                         static_cast<int>(p.dim), (vector & kVectorQ) != 0, SwizzledRows<kBlockM>{});
  load_tile<kBlockM, kD, kHopperThreads>(smem.grad_o + buf * Tile::kQueryElements, grad_o, seq.out_position * p.v_dim,
                                         valid, static_cast<int>(p.v_dim), (vector & kVectorGradO) != 0,
                                         SwizzledRows<kBlockM>{});
  stage_row_stats<kBlockM, kHopperThreads>(p, grads.delta, seq, h, i0, valid, smem.lse + buf * kBlockM,
                                           smem.delta + buf * kBlockM, static_cast<int>(threadIdx.x));
}

// The kv kernels' step `step` (queries i0 .. of head h): the next step's copies, the wait for this
// one's, and whether the mask shows the CTA's keys to any of its queries (kAlways: true).
template <int kD, bool kAlways, typename T>
__device__ __forceinline__ bool wait_for_query_step(const AttentionCudaParams<T>& params,
                                                    const AttentionCudaGrads<T>& grads,
                                                    const KeyBlockWork<HopperKvTile<kD>::kBlockN,
                                                                       HopperKvTile<kD>::kBlockM>& work,
                                                    const HopperKvSmem<kD>& smem, int step, unsigned vector) {
  using Tile = HopperKvTile<kD>;
  const int64_t h = work.head(step);
  const int i0 = work.i0(step);
  return wait_for_shown_stage<kAlways>(
      step + 1 < work.steps,
      [&] { load_query_stage<kD>(params, grads, work, smem, step + 1, (step + 1) & 1, vector); },
      [&] {
        return mask_shows_any<Tile::kBlockM, Tile::kBlockN, kHopperThreads, kCpAsyncMaskLoads>(
            params.base, work.b, work.j0, work.k_len, HeadQueries{h, i0, work.q_len});
      });
}

// The q kernels' key block n of `blocks` (kv: its staged tiles): the next block's copies, the wait
// for this one's, and whether the mask shows its keys to any of the tile's queries (i0 .. of head h).
template <int kBlockM, int kBlockN, bool kAlways, typename Kv>
__device__ __forceinline__ bool wait_for_key_block(const AttentionParams& p, const Kv& kv, const BlockRange& blocks,
                                                   int n, int64_t b, int64_t h, int i0, int q_len, int k_len) {
  return wait_for_shown_stage<kAlways>(
      n + 1 < blocks.count, [&] { kv.load(blocks.first + n + 1, (n + 1) & 1); },
      [&] {
        return mask_shows_any<kBlockM, kBlockN, kHopperThreads, kCpAsyncMaskLoads>(
            p, b, (blocks.first + n) * kBlockN, k_len, HeadQueries{h, i0, q_len});
      });
}

// One step of a kv kernel for warpgroup `group`'s 64 keys and the 64 queries (from i0, of head h) in
// stage s: S^T and dP^T, the elements, then dV += P_drop^T dO and dK += dS^T Q; every product has
// landed on return. With ds_tile, dS also goes there in T: query c's dS of the warp's 16 keys at
// ds_tile + c kDsStride.
template <typename T, int kD, bool kPlain, int kTiles>
__device__ __forceinline__ void hopper_key_block_step(float (&acc_dk)[kTiles][4], float (&acc_dv)[kTiles][4],
                                                      const AttentionParams& p,
                                                      const KeyBlockWork<HopperKvTile<kD>::kBlockN,
                                                                         HopperKvTile<kD>::kBlockM>& work,
                                                      const HopperKvSmem<kD>& smem, int s, int group, int64_t h,
                                                      int i0, const int (&key_j)[2], const Dropout& drop,
                                                      uint16_t* ds_tile = nullptr) {
  constexpr int kBlockM = HopperKvTile<kD>::kBlockM, kBlockN = HopperKvTile<kD>::kBlockN, kST = kBlockM / 8;
  float acc_s[kST][4], acc_dp[kST][4];
  wgmma_abt_async<T, kD>(acc_s, smem.k_address + group * 64 * 128, kBlockN, smem.q_tile(s), kBlockM);
  wgmma_abt_async<T, kD>(acc_dp, smem.v_address + group * 64 * 128, kBlockN, smem.grad_o_tile(s), kBlockM);
  wgmma_wait<0>();
  pin_registers(acc_s);
  pin_registers(acc_dp);
  // Element (key j, query i): acc_s becomes P after dropout, acc_dp dS (times the soft-cap's slope).
  const bool check = !block_inside(work.band, i0, kBlockM, work.j0, kBlockN, work.k_len);
  key_block_elements<kPlain>(p, work.seq, work.band, work.b, h, acc_s, acc_dp, i0, key_j, check,
                             smem.lse + s * kBlockM, smem.delta + s * kBlockM, drop);
  if (ds_tile != nullptr) store_transposed<T>(ds_tile, kDsStride, 0, acc_dp);
  uint32_t a_p[kBlockM / 16][4], a_ds[kBlockM / 16][4];
  fragments_of<T>(a_p, acc_s);
  fragments_of<T>(a_ds, acc_dp);
  wgmma_ab_async<T, kD>(acc_dv, a_p, smem.grad_o_tile(s), kBlockM);
  wgmma_ab_async<T, kD>(acc_dk, a_ds, smem.q_tile(s), kBlockM);
  wgmma_wait<0>();
  pin_registers(acc_dv);
  pin_registers(acc_dk);
  pin_registers(a_p);
  pin_registers(a_ds);
}

// dQ += dS K of a step, added to dq_accum with atomics: warpgroup `group` multiplies ds_tile (the
// step's dS, [query][key], every warp's stored) by K for all 64 queries (from i0, of head h) and 64
// columns over kKeys keys: head dim 64, its own keys and all columns; 128, all keys and its half of
// the columns. Its warp `warp` (0 .. 3) adds rows 16 warp .. 16 warp + 15.
template <typename T, int kD>
__device__ __forceinline__ void hopper_add_dq(const AttentionParams& p,
                                              const KeyBlockWork<HopperKvTile<kD>::kBlockN,
                                                                 HopperKvTile<kD>::kBlockM>& work,
                                              uint32_t k_address, const uint16_t* ds_tile, int group, int warp,
                                              int64_t h, int i0, float* dq_accum) {
  constexpr int kBlockN = HopperKvTile<kD>::kBlockN, kKeys = kD == 64 ? 64 : 128;
  const int key_first = kD == 64 ? group * 64 : 0, col0 = kD == 64 ? 0 : group * 64;
  const int gid = (threadIdx.x % 32) / 4;
  float acc_dq[8][4];
  zero(acc_dq);
#pragma unroll
  for (int chunk = 0; chunk < kKeys / 64; ++chunk) {
    const int key0 = key_first + chunk * 64;
    uint32_t a[4][4];
    load_a_fragments(a, ds_tile, kDsStride, warp * 16, key0);
    wgmma_ab_async<T, 64>(acc_dq, a, k_address + (col0 / 64) * kBlockN * 128 + key0 * 128, kBlockN);
    wgmma_wait<0>();
    pin_registers(acc_dq);
    pin_registers(a);
  }
  const int row_i[2] = {i0 + warp * 16 + gid, i0 + warp * 16 + gid + 8};
  add_query_grads<false>(p, dq_accum, work.seq, h, row_i, work.q_len, col0, acc_dq);
}

// Zeros for a warp's 16 keys of a dS tile of kQueries rows (ds_tile at its first key), for a
// warpgroup without keys.
template <int kQueries>
__device__ __forceinline__ void zero_ds_keys(uint16_t* ds_tile) {
  for (int e = threadIdx.x % 32; e < kQueries * 16; e += 32) ds_tile[(e / 16) * kDsStride + e % 16] = 0;
}

template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kHopperThreads, 1)
    attention_backward_kv_sm90_kernel(const __grid_constant__ AttentionCudaParams<T> params,
                                      const __grid_constant__ AttentionCudaGrads<T> grads, int k_blocks,
                                      unsigned vector) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another target of a fat binary: the launcher never runs it there
#else
  using Tile = HopperKvTile<kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
  const AttentionParams& p = params.base;

  const KeyBlockWork<kBlockN, kBlockM> work(p, k_blocks);
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int j0 = work.j0, cols = work.cols, steps = work.steps;

  extern __shared__ uint4 smem_raw[];
  const HopperKvSmem<kD> smem(smem_raw);

  load_key_tiles<kD>(params, work, smem, vector);
  if (steps > 0) load_query_stage<kD>(params, grads, work, smem, 0, 0, vector);
  cp_async_commit();

  const int warp = threadIdx.x / 32, gid = (threadIdx.x % 32) / 4, wg = warp / 4;
  const int key_j[2] = {j0 + warp * 16 + gid, j0 + warp * 16 + gid + 8};
  const bool group_busy = wg * 64 < cols;  // wgmma runs a whole warpgroup: one without keys skips together
  // dQ with atomics, where it adds no spills: not in the non-plain d128 variant (172 -> 256 bytes).
  float* const dq_accum = kCpAsyncAtomicDq<kD, kPlain> ? grads.dq_accum : nullptr;
  uint16_t* s_ds = reinterpret_cast<uint16_t*>(smem.end);  // dS, [query][key], for dQ with atomics
  float acc_dk[kD / 8][4], acc_dv[kD / 8][4];
  zero(acc_dk);
  zero(acc_dv);
  const Dropout drop = kPlain ? Dropout{} : dropout_of(p);

  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    const int64_t h = work.head(step);
    const int i0 = work.i0(step);
    constexpr bool kAlways = kPlain || !kCpAsyncKvSkipsHidden<kD>;
    // The mask hides the keys from every query of the step: nothing to add.
    if (!wait_for_query_step<kD, kAlways>(params, grads, work, smem, step, vector)) continue;
    uint16_t* ds_keys = dq_accum != nullptr ? s_ds + warp * 16 : nullptr;  // this warp's keys of dS
    if (group_busy) {
      hopper_key_block_step<T, kD, kPlain>(acc_dk, acc_dv, p, work, smem, buf, wg, h, i0, key_j, drop, ds_keys);
    } else if (ds_keys != nullptr) {
      zero_ds_keys<kBlockM>(ds_keys);
    }
    if (dq_accum != nullptr) {
      __syncthreads();  // every warp's dS is in
      // A warpgroup without keys has no dQ to add at head dim 64; at 128 it has its columns' share.
      if (kD == 128 || group_busy) hopper_add_dq<T, kD>(p, work, smem.k_address, s_ds, wg, warp % 4, h, i0, dq_accum);
    }
    __syncthreads();  // the buffer is refilled by the next step's prefetch (and dS rewritten)
  }
  cp_async_wait<0>();
  store_key_grads<T, kD / 8>(p, grads.grad_k, grads.grad_v, work.seq, work.hk, key_j, 0, acc_dk, acc_dv);
#endif
}

// Head dim 256: P^T and dS^T of a step ([key][query], rows padded for ldmatrix), after HopperKvSmem.
constexpr int kPdsStride = 64 + 8;
struct HopperKvD256Tile : HopperKvTile<256> {
  static constexpr int kSmemBytes = HopperKvTile<256>::kSmemBytes + 2 * kBlockN * kPdsStride * 2;
  static_assert(kSmemBytes <= 227 * 1024, "the d256 kv kernel's tiles must fit an sm_90 CTA");
};

// The kv kernel at head dim 256. dK and dV of a warp's 16 keys over 256 columns would take all its
// registers, so the warpgroups split the columns instead of the keys: the CTA takes 64 keys, and
// in each step warpgroup g computes S^T and dP^T of those keys and its half of the 64 queries
// (N = 32). Both halves of P^T and dS^T meet in shared memory, from which each warpgroup takes A
// fragments (ldmatrix) for dV += P_drop^T dO and dK += dS^T Q over its 128 columns, then (ldmatrix
// .trans) for dQ += dS K over the same columns, added with atomics (with grads.dq_accum; else
// attention_backward_q_sm90_d256_kernel computes dQ).
template <typename T, bool kPlain>
__global__ void __launch_bounds__(kHopperThreads, 1)
    attention_backward_kv_sm90_d256_kernel(const __grid_constant__ AttentionCudaParams<T> params,
                                           const __grid_constant__ AttentionCudaGrads<T> grads, int k_blocks,
                                           unsigned vector) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another target of a fat binary: the launcher never runs it there
#else
  constexpr int kD = 256;
  using Tile = HopperKvTile<kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kHalfM = kBlockM / 2;
  static_assert(kBlockN == 64 && kBlockM == 64, "P^T and dS^T are 64 x 64");
  const AttentionParams& p = params.base;

  const KeyBlockWork<kBlockN, kBlockM> work(p, k_blocks);
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int steps = work.steps;

  extern __shared__ uint4 smem_raw[];
  const HopperKvSmem<kD> smem(smem_raw);
  uint16_t* s_p = reinterpret_cast<uint16_t*>(smem.end);  // P_drop^T, [key][query]
  uint16_t* s_ds = s_p + kBlockN * kPdsStride;             // dS^T (times the soft-cap's slope)

  load_key_tiles<kD>(params, work, smem, vector);
  if (steps > 0) load_query_stage<kD>(params, grads, work, smem, 0, 0, vector);
  cp_async_commit();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gid = lane / 4, group = warp / 4, row0 = (warp % 4) * 16;
  const int q0 = group * kHalfM;  // this warpgroup's queries of a step
  const int key_j[2] = {work.j0 + row0 + gid, work.j0 + row0 + gid + 8};
  float acc_dk[16][4], acc_dv[16][4];  // columns 128 group ..
  zero(acc_dk);
  zero(acc_dv);
  const Dropout drop = kPlain ? Dropout{} : dropout_of(p);

  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    const int64_t h = work.head(step);
    const int i0 = work.i0(step);
    // The mask hides the keys from every query of the step: nothing to add.
    if (!wait_for_query_step<kD, kPlain>(params, grads, work, smem, step, vector)) continue;
    {
      float acc_s[kHalfM / 8][4], acc_dp[kHalfM / 8][4];
      wgmma_abt_async<T, kD>(acc_s, smem.k_address, kBlockN, smem.q_tile(buf) + q0 * 128, kBlockM);
      wgmma_abt_async<T, kD>(acc_dp, smem.v_address, kBlockN, smem.grad_o_tile(buf) + q0 * 128, kBlockM);
      wgmma_wait<0>();
      pin_registers(acc_s);
      pin_registers(acc_dp);
      const bool check = !block_inside(work.band, i0, kBlockM, work.j0, kBlockN, work.k_len);
      key_block_elements<kPlain>(p, work.seq, work.band, work.b, h, acc_s, acc_dp, i0 + q0, key_j, check,
                                 smem.lse + buf * kBlockM + q0, smem.delta + buf * kBlockM + q0, drop);
      store_rows<T>(s_p, kPdsStride, row0, q0, acc_s);
      store_rows<T>(s_ds, kPdsStride, row0, q0, acc_dp);
    }
    __syncthreads();  // both warpgroups' halves of P^T and dS^T are in
    {
      // A fragments of the warp's 16 keys over the 64 queries (pattern A, tiles stored [m][k]).
      uint32_t a_p[kBlockM / 16][4], a_ds[kBlockM / 16][4];
      load_a_fragments(a_p, s_p, kPdsStride, row0, 0);
      load_a_fragments(a_ds, s_ds, kPdsStride, row0, 0);
      const uint32_t columns = 2 * group * kBlockM * 128;  // the group's two 64-column halves
      wgmma_ab_async<T, 128>(acc_dv, a_p, smem.grad_o_tile(buf) + columns, kBlockM);
      wgmma_ab_async<T, 128>(acc_dk, a_ds, smem.q_tile(buf) + columns, kBlockM);
      wgmma_wait<0>();
      pin_registers(acc_dv);
      pin_registers(acc_dk);
      pin_registers(a_p);
      pin_registers(a_ds);
    }
    if (grads.dq_accum != nullptr) {
      // dS's A fragments of queries row0 .. row0 + 15 over the 64 keys, from dS^T ([k][m], .trans):
      // lanes 8i .. 8i + 7 address matrix i's key rows (keys + 8 for i >= 2), query columns + 8 for odd i.
      uint32_t a_ds[kBlockN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const int key = kk * 16 + lane % 8 + 8 * (lane / 16), query = row0 + 8 * ((lane / 8) % 2);
        ldsm_x4_trans(a_ds[kk], s_ds + key * kPdsStride + query);
      }
      const int row_i[2] = {i0 + row0 + gid, i0 + row0 + gid + 8};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int chunk = 2 * group + half;  // columns 64 chunk ..
        float acc_dq[8][4];
        zero(acc_dq);
        wgmma_ab_async<T, 64>(acc_dq, a_ds, smem.k_address + chunk * kBlockN * 128, kBlockN);
        wgmma_wait<0>();
        pin_registers(acc_dq);
        add_query_grads<false>(p, grads.dq_accum, work.seq, h, row_i, work.q_len, chunk * 64, acc_dq);
      }
      pin_registers(a_ds);
    }
    __syncthreads();  // the stage is refilled by the next step's prefetch, P^T and dS^T rewritten
  }
  cp_async_wait<0>();
  store_key_grads<T, 16>(p, grads.grad_k, grads.grad_v, work.seq, work.hk, key_j, group * 128, acc_dk, acc_dv);
#endif
}

// The q kernel at head dim 256, for the deterministic backward: as the kv kernel there, the
// warpgroups split dQ's columns (128 each) instead of the queries. A CTA takes 64 queries of one
// head; at each key block of 64, warpgroup g computes S and dP of all 64 queries and its half of the
// keys (N = 32), stores its half of dS ([query][key]) in shared memory, and after a barrier adds
// dS K over its columns (A fragments by ldmatrix, K read MN-major).
struct HopperQD256Tile {
  static constexpr int kBlockM = 64, kBlockN = 64;
  static constexpr int kQueryElements = kBlockM * 256, kKeyElements = kBlockN * 256;
  // Q and dO, K and V double-buffered (swizzled), then dS.
  static constexpr int kSmemBytes = static_cast<int>(kSwizzleAtomBytes) + (2 * kQueryElements + 4 * kKeyElements) * 2 +
                                    kBlockM * kPdsStride * 2;
  static_assert(kSmemBytes <= 227 * 1024, "the d256 q kernel's tiles must fit an sm_90 CTA");
};

template <typename T, bool kPlain>
__global__ void __launch_bounds__(kHopperThreads, 1)
    attention_backward_q_sm90_d256_kernel(const __grid_constant__ AttentionCudaParams<T> params,
                                          const __grid_constant__ AttentionCudaGrads<T> grads, QueryLayout layout,
                                          unsigned vector) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another target of a fat binary: the launcher never runs it there
#else
  constexpr int kD = 256;
  using Tile = HopperQD256Tile;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kHalfN = kBlockN / 2;
  const AttentionParams& p = params.base;

  const QueryTile<kBlockM, kBlockN> work(p, layout);  // one head per tile
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int64_t b = work.b, h = work.h0;
  const AttentionSequence& seq = work.seq;
  const int i0 = work.i0, q_len = work.q_len;
  const BlockRange blocks = work.blocks;

  extern __shared__ uint4 smem_raw[];
  uint32_t q_address;
  uint16_t* s_q = reinterpret_cast<uint16_t*>(swizzle_aligned(smem_raw, q_address));
  uint16_t* s_do = s_q + Tile::kQueryElements;
  const uint32_t do_address = q_address + Tile::kQueryElements * 2;
  const KeyValueTiles<kBlockN, kD, true, kHopperThreads> kv(params, seq, b, work.hk, s_do + Tile::kQueryElements,
                                                           vector);
  uint16_t* s_ds = s_do + Tile::kQueryElements + kv.kElements;  // dS, [query][key]
  const uint16_t* q = reinterpret_cast<const uint16_t*>(params.q) + attention_q_at(p, seq, b, h, i0);
  const uint16_t* grad_o = reinterpret_cast<const uint16_t*>(grads.grad_o) + seq.out_row(h, i0) * p.v_dim;
  load_tile<kBlockM, kD, kHopperThreads>(s_q, q, p.q_stride[2], work.rows, static_cast<int>(p.dim),
                                         (vector & kVectorQ) != 0, SwizzledRows<kBlockM>{});
  load_tile<kBlockM, kD, kHopperThreads>(s_do, grad_o, seq.out_position * p.v_dim, work.rows, static_cast<int>(p.v_dim),
                                         (vector & kVectorGradO) != 0, SwizzledRows<kBlockM>{});
  if (blocks.count > 0) kv.load(blocks.first, 0);
  cp_async_commit();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gid = lane / 4, group = warp / 4, row0 = (warp % 4) * 16;
  const int key0 = group * kHalfN;  // this warpgroup's keys of a block
  const int row_i[2] = {i0 + row0 + gid, i0 + row0 + gid + 8};
  float row_lse[2], row_delta[2];
  query_row_stats(p, grads.delta, seq, h, row_i, q_len, row_lse, row_delta);
  float acc_dq[16][4];  // columns 128 group ..
  zero(acc_dq);
  const Dropout drop = kPlain ? Dropout{} : dropout_of(p);

  for (int n = 0; n < blocks.count; ++n) {
    const int buf = n & 1, j0 = (blocks.first + n) * kBlockN;
    // The mask hides the block from every query of the tile: nothing to add.
    if (!wait_for_key_block<kBlockM, kBlockN, kPlain>(p, kv, blocks, n, b, h, i0, q_len, work.k_len)) continue;
    const uint32_t k_tile = smem_address(kv.k_tile(buf)), v_tile = smem_address(kv.v_tile(buf));
    {
      float acc_s[kHalfN / 8][4], acc_dp[kHalfN / 8][4];
      wgmma_abt_async<T, kD>(acc_s, q_address, kBlockM, k_tile + key0 * 128, kBlockN);
      wgmma_abt_async<T, kD>(acc_dp, do_address, kBlockM, v_tile + key0 * 128, kBlockN);
      wgmma_wait<0>();
      pin_registers(acc_s);
      pin_registers(acc_dp);
      // Element (query i, key j): acc_s becomes dS times the soft-cap's slope; dS to grad_s when asked.
      const bool check = !block_inside(work.band, i0, kBlockM, j0, kBlockN, work.k_len);
      query_block_elements<kPlain>(p, seq, work.band, b, h, acc_s, acc_dp, row_i, j0 + key0, check, row_lse,
                                   row_delta, drop, grads.grad_s, grads.grad_s_row0);
      store_rows<T>(s_ds, kPdsStride, row0, key0, acc_s);
    }
    __syncthreads();  // both warpgroups' halves of dS are in
    uint32_t a[kBlockN / 16][4];
    load_a_fragments(a, s_ds, kPdsStride, row0, 0);
    wgmma_ab<T, 128>(acc_dq, a, k_tile + 2 * group * kBlockN * 128, kBlockN);
    pin_registers(a);
    __syncthreads();  // the buffer is refilled by the next step's prefetch, dS rewritten
  }
  cp_async_wait<0>();
  store_query_grads<T, 16>(p, grads.grad_q, seq, h, row_i, q_len, group * 128, acc_dq);
#endif
}

// The kv kernel's tensor maps for TMA: q and grad_o in boxes of 64 query rows, k and v of 128 keys
// (64 columns each).
struct HopperBackwardMaps {
  CUtensorMap q, grad_o, k, v;
};
constexpr int kBackwardBarrierBytes = 8 * 8;  // the warp-specialized kv kernel's 5 mbarriers, after the tiles
// The warp-specialized kv kernel's shared memory: HopperKvSmem's tiles, the mbarriers, dS.
template <int kD>
constexpr int kWarpSpecializedKvSmemBytes =
    HopperKvTile<kD>::kSmemBytes + kBackwardBarrierBytes + 2 * kDsStageElements * 2;
// The producer's loops index in 64 bits: at 24 registers (the forward's) they would spill. Its 32
// leave the consumers 232 (at 240 they waited for ever on an H200: registers_fit; at 232 the d128
// plain kernel spills 16 bytes).
constexpr int kBackwardProducerRegisters = 32, kBackwardConsumerRegisters = 232;
static_assert(registers_fit(kBackwardProducerRegisters, kBackwardConsumerRegisters),
              "the consumers' registers must come out of the producer's");

// attention_backward_kv_sm90_kernel warp-specialized, for dense inputs that TMA can address: a third,
// producer warpgroup gives up its registers; its thread 0 loads K and V once and each step's Q and
// dO with TMA, and kBlockM of its threads each step's lse and delta, into two stages that the
// consumers release once the step's last products have read them. No block-wide barrier in the loop.
template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kHopperThreads + kProducerThreads, 1)
    attention_backward_kv_sm90_tma_kernel(const __grid_constant__ AttentionCudaParams<T> params,
                                          const __grid_constant__ AttentionCudaGrads<T> grads,
                                          const __grid_constant__ HopperBackwardMaps maps, int k_blocks) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another target of a fat binary: the launcher never runs it there
#else
  using Tile = HopperKvTile<kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kHalves = kD / 64;
  static_assert(kBlockN == 128 && kBlockM == 64, "dS's tile is 64 x 128");
  static_assert(kWarpSpecializedKvSmemBytes<kD> <= 227 * 1024, "the tiles, barriers and dS must fit a CTA");
  const AttentionParams& p = params.base;

  const KeyBlockWork<kBlockN, kBlockM> work(p, k_blocks);
  if (!work.inside) return;  // past the keys (the whole CTA)
  const int steps = work.steps;

  extern __shared__ uint4 smem_raw[];
  const HopperKvSmem<kD> smem(smem_raw);
  // kv_full (K and V); per stage s, full[s] (Q and dO by TMA, then the arrivals of the kBlockM
  // threads that stored lse and delta) and empty[s] (every consumer thread).
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(smem.end);
  uint64_t* full = kv_full + 1;
  uint64_t* empty = kv_full + 3;
  uint16_t* s_ds = reinterpret_cast<uint16_t*>(reinterpret_cast<char*>(smem.end) + kBackwardBarrierBytes);
  if (threadIdx.x == 0) {
    mbarrier_init(kv_full, 1);
    for (int s = 0; s < 2; ++s) {
      mbarrier_init(full + s, 1 + kBlockM);
      mbarrier_init(empty + s, kHopperThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warp = threadIdx.x / 32;
  // The phase parity in which step n's stage fills, and in which step n - 2's was emptied.
  const auto filled = [](int n) { return static_cast<uint32_t>(n >> 1) & 1; };
  const auto emptied = [](int n) { return static_cast<uint32_t>((n >> 1) - 1) & 1; };
  if (warp < kProducerThreads / 32) {
    setmaxnreg_dec<kBackwardProducerRegisters>();
    const int b = static_cast<int>(work.b);
    if (threadIdx.x == 0) {
      if (steps > 0) {
        const int hk = static_cast<int>(work.hk);
        mbarrier_arrive_expect_tx(kv_full, 2 * Tile::kKeyElements * 2);
        for (int half = 0; half < kHalves; ++half) {
          tma_load_4d(smem.k + half * kBlockN * 64, &maps.k, half * 64, work.j0, hk, b, kv_full);
          tma_load_4d(smem.v + half * kBlockN * 64, &maps.v, half * 64, work.j0, hk, b, kv_full);
        }
      }
      for (int n = 0; n < steps; ++n) {
        const int s = n & 1, h = static_cast<int>(work.head(n)), i0 = work.i0(n);
        if (n >= 2) mbarrier_wait(empty + s, emptied(n));
        mbarrier_arrive_expect_tx(full + s, 2 * Tile::kQueryElements * 2);
        for (int half = 0; half < kHalves; ++half) {
          const int at = s * Tile::kQueryElements + half * kBlockM * 64;
          tma_load_4d(smem.q + at, &maps.q, half * 64, i0, h, b, full + s);
          tma_load_4d(smem.grad_o + at, &maps.grad_o, half * 64, i0, h, b, full + s);
        }
      }
    } else if (threadIdx.x >= 32 && threadIdx.x < 32 + kBlockM) {
      for (int n = 0; n < steps; ++n) {
        const int s = n & 1, i0 = work.i0(n);
        if (n >= 2) mbarrier_wait(empty + s, emptied(n));
        stage_row_stats<kBlockM, kBlockM>(p, grads.delta, work.seq, work.head(n), i0, min(kBlockM, work.q_len - i0),
                                          smem.lse + s * kBlockM, smem.delta + s * kBlockM,
                                          static_cast<int>(threadIdx.x) - 32);
        mbarrier_arrive(full + s);
      }
    }
    return;
  }
  setmaxnreg_inc<kBackwardConsumerRegisters>();
  const int consumer_warp = warp - kProducerThreads / 32, group = consumer_warp / 4;
  const int lane = threadIdx.x % 32, gid = lane / 4;
  const int key_j[2] = {work.j0 + consumer_warp * 16 + gid, work.j0 + consumer_warp * 16 + gid + 8};
  float* const dq_accum = grads.dq_accum;
  float acc_dk[kD / 8][4], acc_dv[kD / 8][4];
  zero(acc_dk);
  zero(acc_dv);
  const Dropout drop = kPlain ? Dropout{} : dropout_of(p);

  // A warpgroup skips the products of a step whose queries the mask hides all its 64 keys from
  // (warpgroup_sees_block), and of every step when it has no key; its dS is then zeros. Each step's
  // products land inside hopper_key_block_step: none is in flight across a branch, which would make
  // ptxas serialize every wgmma (C7518).
  const bool masked = !kPlain && p.mask_kind != AttentionMask::kNone;
  const bool group_busy = work.j0 + group * 64 < work.k_len;
  const auto shown = [&](int64_t h, int i0) {
    return warpgroup_sees_block<kBlockM, 64>(p, masked, group_busy, group, work.b, work.j0 + group * 64, work.k_len,
                                             HeadQueries{h, i0, work.q_len}, consumer_warp % 4 * 32 + lane);
  };
  if (steps > 0) mbarrier_wait(kv_full, 0);
  for (int n = 0; n < steps; ++n) {
    const int s = n & 1, i0 = work.i0(n);
    const int64_t h = work.head(n);
    mbarrier_wait(full + s, filled(n));
    uint16_t* ds_tile = s_ds + s * kDsStageElements;  // [query][key]
    uint16_t* ds_keys = dq_accum != nullptr ? ds_tile + consumer_warp * 16 : nullptr;  // this warp's keys
    const bool step_shown = shown(h, i0);
    if (step_shown) {
      hopper_key_block_step<T, kD, kPlain>(acc_dk, acc_dv, p, work, smem, s, group, h, i0, key_j, drop, ds_keys);
    } else if (ds_keys != nullptr) {
      zero_ds_keys<kBlockM>(ds_keys);
    }
    if (dq_accum != nullptr) {
      // dS of stage s is rewritten two steps on, after every consumer has passed the next barrier.
      named_barrier_sync(1, kHopperThreads);  // barrier 1: every consumer's dS is in
      // At head dim 64 a warpgroup adds its own keys' share of dQ, nothing when its dS is zeros; at
      // 128 its columns' share over every key.
      if (kD == 128 || step_shown) {
        hopper_add_dq<T, kD>(p, work, smem.k_address, ds_tile, group, consumer_warp % 4, h, i0, dq_accum);
      }
    }
    mbarrier_arrive(empty + s);  // Q, dO, lse and delta of this stage are read
  }
  store_key_grads<T, kD / 8>(p, grads.grad_k, grads.grad_v, work.seq, work.hk, key_j, 0, acc_dk, acc_dv);
#endif
}

template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kHopperThreads, 1)
    attention_backward_q_sm90_kernel(const __grid_constant__ AttentionCudaParams<T> params,
                                     const __grid_constant__ AttentionCudaGrads<T> grads, QueryLayout layout,
                                     unsigned vector) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another target of a fat binary: the launcher never runs it there
#else
  using Tile = HopperQTile<kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kST = kBlockN / 8;
  const AttentionParams& p = params.base;

  const QueryTile<kBlockM, kBlockN> work(p, layout);  // one head per tile
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int64_t b = work.b, h = work.h0;
  const AttentionSequence& seq = work.seq;
  const int i0 = work.i0, q_len = work.q_len, k_len = work.k_len;
  const int dim = static_cast<int>(p.dim), v_dim = static_cast<int>(p.v_dim);
  const BlockRange blocks = work.blocks;

  extern __shared__ uint4 smem_raw[];
  uint32_t q_address;
  uint16_t* s_q = reinterpret_cast<uint16_t*>(swizzle_aligned(smem_raw, q_address));
  uint16_t* s_do = s_q + Tile::kQueryElements;
  const uint32_t do_address = q_address + Tile::kQueryElements * 2;
  const KeyValueTiles<kBlockN, kD, true, kHopperThreads> kv(params, seq, b, work.hk, s_do + Tile::kQueryElements,
                                                           vector);
  const uint16_t* q = reinterpret_cast<const uint16_t*>(params.q) + attention_q_at(p, seq, b, h, i0);
  const uint16_t* grad_o = reinterpret_cast<const uint16_t*>(grads.grad_o) + seq.out_row(h, i0) * p.v_dim;
  load_tile<kBlockM, kD, kHopperThreads>(s_q, q, p.q_stride[2], work.rows, dim, (vector & kVectorQ) != 0,
                                         SwizzledRows<kBlockM>{});
  load_tile<kBlockM, kD, kHopperThreads>(s_do, grad_o, seq.out_position * p.v_dim, work.rows, v_dim,
                                         (vector & kVectorGradO) != 0, SwizzledRows<kBlockM>{});
  if (blocks.count > 0) kv.load(blocks.first, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, gid = (threadIdx.x % 32) / 4, wg = warp / 4;
  const int row_i[2] = {i0 + warp * 16 + gid, i0 + warp * 16 + gid + 8};
  float row_lse[2], row_delta[2];
  query_row_stats(p, grads.delta, seq, h, row_i, q_len, row_lse, row_delta);
  const bool group_busy = work.any_row(wg * 64, 64);
  float acc_dq[kD / 8][4];
  zero(acc_dq);
  const Dropout drop = kPlain ? Dropout{} : dropout_of(p);

  for (int n = 0; n < blocks.count; ++n) {
    const int buf = n & 1, j0 = (blocks.first + n) * kBlockN;
    // The mask hides the block from every query of the tile: nothing to add.
    if (!wait_for_key_block<kBlockM, kBlockN, kPlain>(p, kv, blocks, n, b, h, i0, q_len, work.k_len)) continue;
    if (group_busy) {
      const uint32_t k_tile = smem_address(kv.k_tile(buf)), v_tile = smem_address(kv.v_tile(buf));
      float acc_s[kST][4], acc_dp[kST][4];
      wgmma_abt_async<T, kD>(acc_s, q_address + wg * 64 * 128, kBlockM, k_tile, kBlockN);
      wgmma_abt_async<T, kD>(acc_dp, do_address + wg * 64 * 128, kBlockM, v_tile, kBlockN);
      wgmma_wait<0>();
      pin_registers(acc_s);
      pin_registers(acc_dp);
      // Element (query i, key j): acc_s becomes dS times the soft-cap's slope; dS to grad_s when asked.
      const bool check = !block_inside(work.band, i0, kBlockM, j0, kBlockN, k_len);
      query_block_elements<kPlain>(p, seq, work.band, b, h, acc_s, acc_dp, row_i, j0, check, row_lse, row_delta, drop,
                                   grads.grad_s, grads.grad_s_row0);
      uint32_t a[kBlockN / 16][4];
      fragments_of<T>(a, acc_s);
      wgmma_ab<T, kD>(acc_dq, a, k_tile, kBlockN);
    }
    __syncthreads();  // the buffer is refilled by the next step's prefetch
  }
  cp_async_wait<0>();
  store_query_grads<T, kD / 8>(p, grads.grad_q, seq, h, row_i, q_len, 0, acc_dq);
#endif
}

// The warp-specialized kv kernel, then the query pass, for dense inputs that TMA can address
// (grad_o is contiguous); `launched` false (and cudaSuccess) where it cannot take the call.
template <typename T, int kD, bool kPlain>
cudaError_t run_backward_sm90_tma(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                                  unsigned vector, cudaStream_t stream, bool& launched) {
  using Tile = HopperKvTile<kD>;
  const AttentionParams& p = params.base;
  launched = false;
  const int64_t q_sizes[3] = {p.batch, p.heads, p.q_len}, kv_sizes[3] = {p.batch, p.kv_heads, p.k_len};
  const int64_t grad_o_stride[3] = {p.heads * p.q_len * p.v_dim, p.q_len * p.v_dim, p.v_dim};
  if (p.cu_seqlens_q != nullptr || p.q_len == 0 || p.k_len == 0 || !tma_addressable(params.q, p.q_stride, q_sizes) ||
      !tma_addressable(params.k, p.k_stride, kv_sizes) || !tma_addressable(params.v, p.v_stride, kv_sizes) ||
      !tma_addressable(grads.grad_o, grad_o_stride, q_sizes)) {
    return cudaSuccess;
  }
  static const bool fits = starts_with_registers_that_fit(attention_backward_kv_sm90_tma_kernel<T, kD, kPlain>,
                                                          kBackwardProducerRegisters, kBackwardConsumerRegisters);
  if (!fits) return cudaSuccess;
  HopperBackwardMaps maps;
  cudaError_t status = tile_map(&maps.q, params.q, p.q_stride, p.batch, p.heads, p.q_len, p.dim, Tile::kBlockM);
  if (status == cudaSuccess) {
    status = tile_map(&maps.grad_o, grads.grad_o, grad_o_stride, p.batch, p.heads, p.q_len, p.v_dim, Tile::kBlockM);
  }
  if (status == cudaSuccess) {
    status = tile_map(&maps.k, params.k, p.k_stride, p.batch, p.kv_heads, p.k_len, p.dim, Tile::kBlockN);
  }
  if (status == cudaSuccess) {
    status = tile_map(&maps.v, params.v, p.v_stride, p.batch, p.kv_heads, p.k_len, p.v_dim, Tile::kBlockN);
  }
  if (status != cudaSuccess) return cudaSuccess;  // no driver entry point, a map the driver refuses
  launched = true;
  const int64_t k_blocks = (p.k_len + Tile::kBlockN - 1) / Tile::kBlockN;
  status = launch_tiles(attention_backward_kv_sm90_tma_kernel<T, kD, kPlain>, k_blocks * p.batch * p.kv_heads,
                        kHopperThreads + kProducerThreads, kWarpSpecializedKvSmemBytes<kD>, stream, params,
                        grads, maps, static_cast<int>(k_blocks));
  if (status != cudaSuccess) return status;
  return launch_query_pass<HopperQTile<kD>>(attention_backward_q_sm90_kernel<T, kD, kPlain>, kHopperThreads, params,
                                            grads, vector, stream);
}

template <typename T, int kD, bool kPlain>
cudaError_t run_backward_sm90_bucket(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                                     unsigned vector, cudaStream_t stream) {
  // Not the non-plain d128 variant warp-specialized: it spills more from a consumer's 240 registers
  // (204 bytes) than from the cp.async kernel's 255 (172).
  if constexpr (kPlain || kD <= 64) {
    bool launched = false;
    const cudaError_t status = run_backward_sm90_tma<T, kD, kPlain>(params, grads, vector, stream, launched);
    if (launched || status != cudaSuccess) return status;
  }
  AttentionCudaGrads<T> chosen = grads;
  if (!kCpAsyncAtomicDq<kD, kPlain>) chosen.dq_accum = nullptr;
  return launch_backward_kernels<HopperKvCpAsyncTile<kD>, HopperQTile<kD>>(
      attention_backward_kv_sm90_kernel<T, kD, kPlain>, attention_backward_q_sm90_kernel<T, kD, kPlain>,
      kHopperThreads, params, chosen, vector, stream);
}

template <typename T, bool kPlain>
cudaError_t run_backward_sm90_d256(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                                   unsigned vector, cudaStream_t stream) {
  return launch_backward_kernels<HopperKvD256Tile, HopperQD256Tile>(
      attention_backward_kv_sm90_d256_kernel<T, kPlain>, attention_backward_q_sm90_d256_kernel<T, kPlain>,
      kHopperThreads, params, grads, vector, stream);
}

}  // namespace

template <typename T>
cudaError_t run_backward_sm90(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                              unsigned vector, cudaStream_t stream) {
  const bool plain = plain_scores(params.base);
  const int width = widest_head_dim(params.base);
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 2) != 0) {
    if (width <= 64) {
      return plain ? run_backward_sm90_bucket<T, 64, true>(params, grads, vector, stream)
                   : run_backward_sm90_bucket<T, 64, false>(params, grads, vector, stream);
    }
  }
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 4) != 0) {
    if (width <= 128) {
      return plain ? run_backward_sm90_bucket<T, 128, true>(params, grads, vector, stream)
                   : run_backward_sm90_bucket<T, 128, false>(params, grads, vector, stream);
    }
  }
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 8) != 0) {
    return plain ? run_backward_sm90_d256<T, true>(params, grads, vector, stream)
                 : run_backward_sm90_d256<T, false>(params, grads, vector, stream);
  }
  return cudaErrorInvalidValue;
}

template cudaError_t run_backward_sm90<__half>(const AttentionCudaParams<__half>&, const AttentionCudaGrads<__half>&,
                                               unsigned, cudaStream_t);
template cudaError_t run_backward_sm90<__nv_bfloat16>(const AttentionCudaParams<__nv_bfloat16>&,
                                                      const AttentionCudaGrads<__nv_bfloat16>&, unsigned, cudaStream_t);

}  // namespace attention_cuda
}  // namespace genfast
