// Attention backward for Hopper (sm_90a) on wgmma: attention_backward.cu's two deterministic
// kernels (no atomics) with two warpgroups, tiles in 128-byte-swizzled shared memory staged by
// cp.async, and the products of attention_hopper.cuh:
//  (1) attention_backward_kv_sm90_kernel: 128 keys per CTA (64 per warpgroup), over the query heads
//      of its kv head and the query blocks of 64 its band reaches:
//        S^T = K Q^T,  dP^T = V dO^T  (wgmma_abt, N = 64 queries)
//        dV += P_drop^T dO,  dK += dS^T Q  (wgmma_ab, B = dO or Q read MN-major)
//  (2) attention_backward_q_sm90_kernel: 128 queries of one head per CTA, over key blocks of 64:
//        S = Q K^T,  dP = dO V^T,  dQ += dS K  (B = K read MN-major); and dS to grad_s when asked.
// Each pair of products above is issued together, then waited for. The per-element work (P from
// lse, dropout replayed, dS) is backward_element, as on sm_80. The launcher in attention_backward.cu
// takes these on sm_90 when GENFAST_ATTENTION_SM90=1 and the build has sm_90a
// (hopper_backward_applies).
#include "attention.cuh"
#include "attention_hopper.cuh"

namespace genfast {
namespace attention_cuda {
namespace {

template <int kD>
struct HopperKvTile {
  static constexpr int kBlockN = 128, kBlockM = 64;  // keys per CTA, queries per step
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

template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kHopperThreads, 1)
    attention_backward_kv_sm90_kernel(const __grid_constant__ AttentionCudaParams<T> params,
                                      const __grid_constant__ AttentionCudaGrads<T> grads, int k_blocks,
                                      unsigned vector) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another target of a fat binary: the launcher never runs it there
#else
  using Tile = HopperKvTile<kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kST = kBlockM / 8;
  const AttentionParams& p = params.base;

  const KeyBlockWork<kBlockN, kBlockM> work(p, k_blocks);
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int64_t b = work.b, hk = work.hk;
  const AttentionSequence& seq = work.seq;
  const int q_len = work.q_len, j0 = work.j0, cols = work.cols, steps = work.steps;
  const int dim = static_cast<int>(p.dim), v_dim = static_cast<int>(p.v_dim);

  extern __shared__ uint4 smem_raw[];
  uint32_t k_address;
  uint16_t* s_k = reinterpret_cast<uint16_t*>(swizzle_aligned(smem_raw, k_address));
  uint16_t* s_v = s_k + Tile::kKeyElements;
  uint16_t* s_q = s_v + Tile::kKeyElements;  // 2 buffers
  uint16_t* s_do = s_q + 2 * Tile::kQueryElements;
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * Tile::kQueryElements);  // 2 x kBlockM
  float* s_delta = s_lse + 2 * kBlockM;
  const uint32_t v_address = k_address + Tile::kKeyElements * 2, q_address = v_address + Tile::kKeyElements * 2;
  const uint32_t do_address = q_address + 2 * Tile::kQueryElements * 2;

  const auto load_queries = [&](int step, int buf) {
    const int64_t h = work.head(step);
    const int i0 = work.i0(step), valid = min(kBlockM, q_len - i0);
    const uint16_t* q = reinterpret_cast<const uint16_t*>(params.q) + attention_q_at(p, seq, b, h, i0);
    const uint16_t* grad_o = reinterpret_cast<const uint16_t*>(grads.grad_o) + seq.out_row(h, i0) * p.v_dim;
    load_tile<kBlockM, kD, kHopperThreads>(s_q + buf * Tile::kQueryElements, q, p.q_stride[2], valid, dim,
                                           (vector & kVectorQ) != 0, SwizzledRows<kBlockM>{});
    load_tile<kBlockM, kD, kHopperThreads>(s_do + buf * Tile::kQueryElements, grad_o, seq.out_position * p.v_dim,
                                           valid, v_dim, (vector & kVectorGradO) != 0, SwizzledRows<kBlockM>{});
    stage_row_stats<kBlockM, kHopperThreads>(p, grads.delta, seq, h, i0, valid, s_lse + buf * kBlockM,
                                             s_delta + buf * kBlockM);
  };

  const uint16_t* k = reinterpret_cast<const uint16_t*>(params.k) + attention_k_at(p, seq, b, hk, j0);
  const uint16_t* v = reinterpret_cast<const uint16_t*>(params.v) + attention_v_at(p, seq, b, hk, j0);
  load_tile<kBlockN, kD, kHopperThreads>(s_k, k, p.k_stride[2], cols, dim, (vector & kVectorK) != 0,
                                         SwizzledRows<kBlockN>{});
  load_tile<kBlockN, kD, kHopperThreads>(s_v, v, p.v_stride[2], cols, v_dim, (vector & kVectorV) != 0,
                                         SwizzledRows<kBlockN>{});
  if (steps > 0) load_queries(0, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, gid = (threadIdx.x % 32) / 4, wg = warp / 4;
  const int key_j[2] = {j0 + warp * 16 + gid, j0 + warp * 16 + gid + 8};
  const bool group_busy = wg * 64 < cols;  // wgmma runs a whole warpgroup: one without keys skips together
  float acc_dk[kD / 8][4], acc_dv[kD / 8][4];
  zero(acc_dk);
  zero(acc_dv);
  const Dropout drop = kPlain ? Dropout{} : dropout_of(p);

  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    const int64_t h = work.head(step);
    const int i0 = work.i0(step);
    wait_for_stage(step + 1 < steps, [&] { load_queries(step + 1, buf ^ 1); });
    if (group_busy) {
      const uint32_t q_tile = q_address + buf * Tile::kQueryElements * 2;
      const uint32_t do_tile = do_address + buf * Tile::kQueryElements * 2;
      const float* lse = s_lse + buf * kBlockM;
      const float* delta = s_delta + buf * kBlockM;
      float acc_s[kST][4], acc_dp[kST][4];
      wgmma_abt_async<T, kD>(acc_s, k_address + wg * 64 * 128, kBlockN, q_tile, kBlockM);
      wgmma_abt_async<T, kD>(acc_dp, v_address + wg * 64 * 128, kBlockN, do_tile, kBlockM);
      wgmma_wait<0>();
      pin_registers(acc_s);
      pin_registers(acc_dp);
      // Element (key j, query i): acc_s becomes P after dropout, acc_dp dS (times the soft-cap's slope).
      const bool check = !block_inside(work.band, i0, kBlockM, j0, kBlockN, work.k_len);
      key_block_elements<kPlain>(p, seq, work.band, b, h, acc_s, acc_dp, i0, key_j, check, lse, delta, drop);
      uint32_t a_p[kBlockM / 16][4], a_ds[kBlockM / 16][4];
      fragments_of<T>(a_p, acc_s);
      fragments_of<T>(a_ds, acc_dp);
      wgmma_ab_async<T, kD>(acc_dv, a_p, do_tile, kBlockM);
      wgmma_ab_async<T, kD>(acc_dk, a_ds, q_tile, kBlockM);
      wgmma_wait<0>();
      pin_registers(acc_dv);
      pin_registers(acc_dk);
      pin_registers(a_p);
      pin_registers(a_ds);
    }
    __syncthreads();  // the buffer is refilled by the next step's prefetch
  }
  cp_async_wait<0>();
  store_key_grads<T, kD / 8>(p, grads.grad_k, grads.grad_v, seq, hk, key_j, 0, acc_dk, acc_dv);
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
    wait_for_stage(n + 1 < blocks.count, [&] { kv.load(blocks.first + n + 1, buf ^ 1); });
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
                                   grads.grad_s);
      uint32_t a[kBlockN / 16][4];
      fragments_of<T>(a, acc_s);
      wgmma_ab<T, kD>(acc_dq, a, k_tile, kBlockN);
    }
    __syncthreads();  // the buffer is refilled by the next step's prefetch
  }
  cp_async_wait<0>();
  store_query_grads<T, kD / 8>(p, grads.grad_q, seq, h, row_i, q_len, acc_dq);
#endif
}

template <typename T, int kD, bool kPlain>
cudaError_t run_backward_sm90_bucket(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                                     unsigned vector, cudaStream_t stream) {
  return launch_backward_kernels<HopperKvTile<kD>, HopperQTile<kD>>(
      attention_backward_kv_sm90_kernel<T, kD, kPlain>, attention_backward_q_sm90_kernel<T, kD, kPlain>,
      kHopperThreads, params, grads, vector, stream);
}

}  // namespace

template <typename T>
cudaError_t run_backward_sm90(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                              unsigned vector, cudaStream_t stream) {
  const bool plain = plain_scores(params.base);
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 2) != 0) {
    if (widest_head_dim(params.base) <= 64) {
      return plain ? run_backward_sm90_bucket<T, 64, true>(params, grads, vector, stream)
                   : run_backward_sm90_bucket<T, 64, false>(params, grads, vector, stream);
    }
  }
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 4) != 0) {
    return plain ? run_backward_sm90_bucket<T, 128, true>(params, grads, vector, stream)
                 : run_backward_sm90_bucket<T, 128, false>(params, grads, vector, stream);
  }
  return cudaErrorInvalidValue;
}

template cudaError_t run_backward_sm90<__half>(const AttentionCudaParams<__half>&, const AttentionCudaGrads<__half>&,
                                               unsigned, cudaStream_t);
template cudaError_t run_backward_sm90<__nv_bfloat16>(const AttentionCudaParams<__nv_bfloat16>&,
                                                      const AttentionCudaGrads<__nv_bfloat16>&, unsigned, cudaStream_t);

}  // namespace attention_cuda
}  // namespace genfast
