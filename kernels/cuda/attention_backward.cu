// Attention backward on tensor cores, FlashAttention-2's scheme in two deterministic kernels (no
// atomics), recomputing P = exp(S - lse) from the forward's log-sum-exp, or, with grads.dq_accum,
// in kernel (1) alone, which then also adds dQ += dS K to dq_accum with atomics (dS through shared
// memory, [query][key]; each warp 16 query rows by a slice of the columns), and a cast to grad_q:
//  (1) attention_backward_kv_kernel: one CTA of 4 warps per (block of keys, batch * kv head). Each
//      warp owns 16 keys (and, for head dims over 128, half of the columns of dK and dV) and works
//      on the transposed products, so that no partial sums cross warps:
//        S^T  = K Q^T        A: K [key][dim] (pattern A)      B: Q [query][dim] (pattern B)
//        dP^T = V dO^T       A: V (pattern A)                 B: dO [query][v_dim] (pattern B)
//        dV  += P_drop^T dO  A: from S^T's C fragments        B: dO (pattern A, .trans)
//        dK  += dS^T Q       A: from dP^T's C fragments       B: Q (pattern A, .trans)
//      over the query heads of its kv head and the query blocks its band reaches (Q, dO, lse and
//      delta double-buffered through cp.async).
//  (2) attention_backward_q_kernel: one CTA per (block of 64 queries, batch * head), each warp 16
//      query rows, over the key blocks its band reaches (K, V double-buffered):
//        S = Q K^T,  dP = dO V^T (B: V [key][v_dim], pattern B),  dQ += dS K (B: K, pattern A .trans)
//      and, when asked, dS (the gradient of the final score, before the soft-cap's chain rule) to
//      grad_s in float32.
// dS = P (dropout-replayed dP - delta), delta = rowsum(dO o) - grad_lse; dK and dQ take
// scale dS times the soft-cap's 1 - tanh^2. The general kernels stage a bool mask's block with the
// tiles they walk (BoolMaskTiles), as the forward does: (1) up to head dim 64, (2) up to 128.
#include "attention.cuh"
#include "attention_hopper.cuh"
#include "attention_mask_tile.cuh"
#include "attention_tile.cuh"

namespace genfast {
namespace attention_cuda {
namespace {

template <int kD, bool kPlain = true>
struct KvTile {
  static constexpr int kKeyWarps = kD <= 128 ? 4 : 2;     // warps along the keys
  static constexpr int kSplit = 4 / kKeyWarps;             // warps along dK's and dV's columns
  static constexpr int kBlockN = 16 * kKeyWarps;           // keys per CTA
  static constexpr int kBlockM = kD <= 64 ? 64 : (kD <= 128 ? 32 : 16);  // queries per step
  static constexpr int kCols = kD / kSplit;                // dK, dV columns per warp
  static constexpr int kStride = kD + 8;
  static constexpr int kTileElems = (2 * kBlockN + 4 * kBlockM) * kStride;  // K, V, 2 x Q, 2 x dO
  // With atomic dQ: dS stored [query][key], and each warp's share of dQ += dS K, 16 query rows by
  // kDqCols columns (the kBlockM / 16 row groups times the column slices make the 4 warps).
  static constexpr int kDsStride = kBlockN + 8;
  static constexpr int kDqRowGroups = kBlockM / 16;
  static constexpr int kDqCols = kD * kDqRowGroups / 4;
  static_assert(kDqRowGroups * (kD / kDqCols) == 4 && kDqCols % 16 == 0, "dQ's shares must make the 4 warps");
  // Not at head dim 128, whose dK and dV accumulators leave no registers for it (the staging's
  // code alone spilled 36 bytes).
  static constexpr bool kStagesMask = !kPlain && kD <= 64;
  using MaskTiles = BoolMaskTiles<kBlockM, kBlockN>;
  // + 2 x (lse, delta) + dS, + a bool mask's blocks
  static constexpr int kMaskOffset = kTileElems * 2 + 4 * kBlockM * 4 + kBlockM * kDsStride * 2;
  static constexpr int kSmemBytes = kMaskOffset + (kStagesMask ? MaskTiles::kBytes : 0);
  static_assert(kSmemBytes <= kMaxSmemBytes, "the kv kernel's tiles must fit every sm_80+ GPU");
};

template <int kD, bool kPlain = true>
struct QTile {
  static constexpr int kBlockM = 64;                   // 16 query rows per warp
  static constexpr int kBlockN = kD <= 64 ? 64 : (kD <= 128 ? 32 : 16);  // keys per step
  static constexpr int kStride = kD + 8;
  static constexpr bool kStagesMask = !kPlain && kD <= 128;
  using MaskTiles = BoolMaskTiles<kBlockM, kBlockN>;
  // Q, dO, then K and V double-buffered, then a bool mask's blocks double-buffered.
  static constexpr int kMaskOffset = (2 * kBlockM * kStride + KeyValueTiles<kBlockN, kD>::kElements) * 2;
  static constexpr int kSmemBytes = kMaskOffset + (kStagesMask ? MaskTiles::kBytes : 0);
  static_assert(kSmemBytes <= kMaxSmemBytes, "the q kernel's tiles must fit every sm_80+ GPU");
};

template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_kv_kernel(const __grid_constant__ AttentionCudaParams<T> params,
                                 const __grid_constant__ AttentionCudaGrads<T> grads, int k_blocks,
                                 unsigned vector) {
  using Tile = KvTile<kD, kPlain>;
  using MaskTiles = typename Tile::MaskTiles;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kStride = Tile::kStride;
  constexpr int kST = kBlockM / 8;         // S^T's n-tiles (queries) per warp
  constexpr int kCT = Tile::kCols / 8;     // dK's and dV's n-tiles per warp
  const AttentionParams& p = params.base;

  const KeyBlockWork<kBlockN, kBlockM> work(p, k_blocks);
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int64_t b = work.b, hk = work.hk;
  const AttentionSequence& seq = work.seq;
  const int q_len = work.q_len, j0 = work.j0, cols = work.cols, steps = work.steps;
  const int dim = static_cast<int>(p.dim), v_dim = static_cast<int>(p.v_dim);

  extern __shared__ uint4 smem_raw[];
  uint16_t* s_k = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* s_v = s_k + kBlockN * kStride;
  uint16_t* s_q = s_v + kBlockN * kStride;   // 2 buffers of kBlockM rows
  uint16_t* s_do = s_q + 2 * kBlockM * kStride;
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * kBlockM * kStride);  // 2 x kBlockM
  float* s_delta = s_lse + 2 * kBlockM;
  uint16_t* s_ds = reinterpret_cast<uint16_t*>(s_delta + 2 * kBlockM);  // [query][key], atomic dQ only
  const bool stage_mask = Tile::kStagesMask && p.mask_kind == AttentionMask::kBool;
  const MaskTiles mask_tiles(p, reinterpret_cast<uint8_t*>(smem_raw) + Tile::kMaskOffset, vector);

  using Step = typename KeyBlockWork<kBlockN, kBlockM>::Step;
  const auto load_queries = [&](const Step& at, int buf) {
    const int64_t h = at.h;
    const int i0 = at.i0, valid = min(kBlockM, q_len - i0);
    load_tile<kBlockM, kD>(s_q + buf * kBlockM * kStride,
                           reinterpret_cast<const uint16_t*>(params.q) + attention_q_at(p, seq, b, h, i0),
                           p.q_stride[2], valid, dim, (vector & kVectorQ) != 0);
    load_tile<kBlockM, kD>(s_do + buf * kBlockM * kStride,
                           reinterpret_cast<const uint16_t*>(grads.grad_o) + seq.out_row(h, i0) * p.v_dim,
                           seq.out_position * p.v_dim, valid, v_dim, (vector & kVectorGradO) != 0);
    stage_row_stats<kBlockM, kThreads>(p, grads.delta, seq, h, i0, valid, s_lse + buf * kBlockM,
                                       s_delta + buf * kBlockM, static_cast<int>(threadIdx.x));
    if (stage_mask) mask_tiles.load(b, j0, work.k_len, HeadQueries{h, i0, q_len}, buf);
  };

  load_tile<kBlockN, kD>(s_k, reinterpret_cast<const uint16_t*>(params.k) + attention_k_at(p, seq, b, hk, j0),
                         p.k_stride[2], cols, dim, (vector & kVectorK) != 0);
  load_tile<kBlockN, kD>(s_v, reinterpret_cast<const uint16_t*>(params.v) + attention_v_at(p, seq, b, hk, j0),
                         p.v_stride[2], cols, v_dim, (vector & kVectorV) != 0);
  if (steps > 0) load_queries(work.first_step(), 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4;
  const int key_warp = warp % Tile::kKeyWarps, col0 = (warp / Tile::kKeyWarps) * Tile::kCols;
  const int a_row = lane % 16, a_col = (lane / 16) * 8;                        // pattern A
  const int b_row = lane % 8 + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;  // pattern B
  const int dim_steps = (dim + 15) / 16, v_steps = (v_dim + 15) / 16;
  const uint16_t* k_frag = s_k + (key_warp * 16 + a_row) * kStride + a_col;
  const uint16_t* v_frag = s_v + (key_warp * 16 + a_row) * kStride + a_col;
  const int key_j[2] = {j0 + key_warp * 16 + gid, j0 + key_warp * 16 + gid + 8};
  constexpr int kDqT = Tile::kDqCols / 8;  // dQ's n-tiles per warp (atomic dQ)
  const int dq_row0 = (warp % Tile::kDqRowGroups) * 16, dq_col0 = (warp / Tile::kDqRowGroups) * Tile::kDqCols;
  const uint16_t* ds_frag = s_ds + (dq_row0 + a_row) * Tile::kDsStride + a_col;
  float* const dq_accum = grads.dq_accum;

  float acc_dk[kCT][4], acc_dv[kCT][4];
  zero(acc_dk);
  zero(acc_dv);
  const Dropout drop = kPlain ? Dropout{} : dropout_of(p);

  Step at = work.first_step();
  for (int step = 0; step < steps; ++step, at = work.next(at)) {
    const int buf = step & 1;
    const int64_t h = at.h;
    const int i0 = at.i0;
    const bool shown = stage_block<kPlain>(
        step + 1 < steps, [&] { load_queries(work.next(at), buf ^ 1); },
        [&] {
          return stage_mask || mask_shows_any<kBlockM, kBlockN>(p, b, j0, work.k_len, HeadQueries{h, i0, q_len});
        },
        [] {}, [&] { return !stage_mask || mask_tiles.shown(buf); });
    if (!shown) continue;  // the mask hides the keys from every query of the step
    const uint16_t* q_tile = s_q + buf * kBlockM * kStride;
    const uint16_t* do_tile = s_do + buf * kBlockM * kStride;
    const float* lse = s_lse + buf * kBlockM;
    const float* delta = s_delta + buf * kBlockM;

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys (rows) and the step's queries (columns).
    float acc_s[kST][4], acc_dp[kST][4];
    zero(acc_s);
    zero(acc_dp);
    mma_a_bt<T, kD>(acc_s, k_frag, q_tile + b_row * kStride + b_col, dim_steps);
    mma_a_bt<T, kD>(acc_dp, v_frag, do_tile + b_row * kStride + b_col, v_steps);

    // Element (key j, query i): acc_s becomes P after dropout, acc_dp dS (times the soft-cap's slope).
    const bool check = !block_inside(work.band, i0, kBlockM, j0, kBlockN, work.k_len);
    key_block_elements<kPlain>(
        p, seq, work.band, b, h, acc_s, acc_dp, i0, key_j, check, lse, delta, drop,
        StagedMask{stage_mask, mask_tiles.tile(buf) + key_warp * 16 + gid, MaskTiles::kStride});
    if (dq_accum != nullptr && col0 == 0) store_transposed<T>(s_ds, Tile::kDsStride, key_warp * 16, acc_dp);

    // dV += P_drop^T dO and dK += dS^T Q over the step's queries (the k dimension).
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t a_p[4], a_ds[4];
      a_from_c<T, kST>(a_p, acc_s, kk);
      a_from_c<T, kST>(a_ds, acc_dp, kk);
      const int at = (kk * 16 + a_row) * kStride + col0 + a_col;
      mma_a_b<T>(acc_dv, a_p, do_tile + at, v_dim - col0);
      mma_a_b<T>(acc_dk, a_ds, q_tile + at, dim - col0);
    }
    if (dq_accum != nullptr) {
      // dQ += dS K over the block's keys, this warp's share, added to dq_accum.
      __syncthreads();  // dS is in
      float acc_dq[kDqT][4];
      zero(acc_dq);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(a, ds_frag + kk * 16);
        mma_a_b<T>(acc_dq, a, s_k + (kk * 16 + a_row) * kStride + dq_col0 + a_col, dim - dq_col0);
      }
      const int row_i[2] = {i0 + dq_row0 + gid, i0 + dq_row0 + gid + 8};
      add_query_grads<true>(p, dq_accum, seq, h, row_i, q_len, dq_col0, acc_dq);
    }
    __syncthreads();  // the buffer is refilled by the next step's prefetch (and dS rewritten)
  }
  cp_async_wait<0>();

  // dK = scale sum dS^T Q and dV, every key of the block (zero where no query reached it).
  store_key_grads<T, kCT>(p, grads.grad_k, grads.grad_v, seq, hk, key_j, col0, acc_dk, acc_dv);
}

// The q kernel's mask reads in flight at a time (mask_shows_any): all 32 of a block would spill
// 108 bytes at head dim 64.
constexpr int kQKernelMaskLoads = 4;

template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_q_kernel(const __grid_constant__ AttentionCudaParams<T> params,
                                const __grid_constant__ AttentionCudaGrads<T> grads, QueryLayout layout,
                                unsigned vector) {
  using Tile = QTile<kD, kPlain>;
  using MaskTiles = typename Tile::MaskTiles;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kStride = Tile::kStride;
  constexpr int kST = kBlockN / 8;  // S's n-tiles (keys) per warp
  constexpr int kQT = kD / 8;       // dQ's n-tiles per warp
  const AttentionParams& p = params.base;

  const QueryTile<kBlockM, kBlockN> work(p, layout);  // one head per tile
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int64_t b = work.b, h = work.h0;
  const AttentionSequence& seq = work.seq;
  const int i0 = work.i0, q_len = work.q_len, k_len = work.k_len;
  const Band band = work.band;
  const BlockRange blocks = work.blocks;
  const int dim = static_cast<int>(p.dim), v_dim = static_cast<int>(p.v_dim);

  extern __shared__ uint4 smem_raw[];
  uint16_t* s_q = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* s_do = s_q + kBlockM * kStride;
  const KeyValueTiles<kBlockN, kD> kv(params, seq, b, work.hk, s_do + kBlockM * kStride, vector);
  const bool stage_mask = Tile::kStagesMask && p.mask_kind == AttentionMask::kBool;
  const MaskTiles mask_tiles(p, reinterpret_cast<uint8_t*>(smem_raw) + Tile::kMaskOffset, vector);
  const auto load_block = [&](int block, int buf) {
    kv.load(block, buf);
    if (stage_mask) mask_tiles.load(b, block * kBlockN, k_len, HeadQueries{h, i0, q_len}, buf);
  };

  load_tile<kBlockM, kD>(s_q, reinterpret_cast<const uint16_t*>(params.q) + attention_q_at(p, seq, b, h, i0),
                         p.q_stride[2], work.rows, dim, (vector & kVectorQ) != 0);
  load_tile<kBlockM, kD>(s_do, reinterpret_cast<const uint16_t*>(grads.grad_o) + seq.out_row(h, i0) * p.v_dim,
                         seq.out_position * p.v_dim, work.rows, v_dim, (vector & kVectorGradO) != 0);
  if (blocks.count > 0) load_block(blocks.first, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4;
  const int a_row = lane % 16, a_col = (lane / 16) * 8;                        // pattern A
  const int b_row = lane % 8 + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;  // pattern B
  const int dim_steps = (dim + 15) / 16, v_steps = (v_dim + 15) / 16;
  const uint16_t* q_frag = s_q + (warp * 16 + a_row) * kStride + a_col;
  const uint16_t* do_frag = s_do + (warp * 16 + a_row) * kStride + a_col;
  const int row_i[2] = {i0 + warp * 16 + gid, i0 + warp * 16 + gid + 8};
  float row_lse[2], row_delta[2];
  query_row_stats(p, grads.delta, seq, h, row_i, q_len, row_lse, row_delta);

  float acc_dq[kQT][4];
  zero(acc_dq);
  const Dropout drop = kPlain ? Dropout{} : dropout_of(p);

  for (int n = 0; n < blocks.count; ++n) {
    const int buf = n & 1, j0 = (blocks.first + n) * kBlockN;
    const bool shown = stage_block<kPlain>(
        n + 1 < blocks.count, [&] { load_block(blocks.first + n + 1, buf ^ 1); },
        [&] {
          return stage_mask || mask_shows_any<kBlockM, kBlockN, kThreads, kQKernelMaskLoads>(
                                   p, b, j0, k_len, HeadQueries{h, i0, q_len});
        },
        [] {}, [&] { return !stage_mask || mask_tiles.shown(buf); });
    if (!shown) continue;  // the mask hides the block from every query of the tile
    const uint16_t* k_tile = kv.k_tile(buf);
    const uint16_t* v_tile = kv.v_tile(buf);

    // S = Q K^T and dP = dO V^T for the warp's 16 query rows.
    float acc_s[kST][4], acc_dp[kST][4];
    zero(acc_s);
    zero(acc_dp);
    mma_a_bt<T, kD>(acc_s, q_frag, k_tile + b_row * kStride + b_col, dim_steps);
    mma_a_bt<T, kD>(acc_dp, do_frag, v_tile + b_row * kStride + b_col, v_steps);

    // Element (query i, key j): acc_s becomes dS times the soft-cap's slope; dS to grad_s when asked.
    const bool check = !block_inside(band, i0, kBlockM, j0, kBlockN, k_len);
    query_block_elements<kPlain>(
        p, seq, band, b, h, acc_s, acc_dp, row_i, j0, check, row_lse, row_delta, drop, grads.grad_s,
        grads.grad_s_row0,
        StagedMask{stage_mask, mask_tiles.tile(buf) + (warp * 16 + gid) * MaskTiles::kStride,
                   MaskTiles::kStride});

    // dQ += dS K over the block's keys (the k dimension).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a_from_c<T, kST>(a, acc_s, kk);
      mma_a_b<T>(acc_dq, a, k_tile + (kk * 16 + a_row) * kStride + a_col, dim);
    }
    __syncthreads();  // the buffer is refilled by the next step's prefetch
  }
  cp_async_wait<0>();

  store_query_grads<T, kQT>(p, grads.grad_q, seq, h, row_i, q_len, 0, acc_dq);
}

template <typename T, int kD, bool kPlain>
cudaError_t run_backward(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads, unsigned vector,
                         cudaStream_t stream) {
  return launch_backward_kernels<KvTile<kD, kPlain>, QTile<kD, kPlain>>(attention_backward_kv_kernel<T, kD, kPlain>,
                                                        attention_backward_q_kernel<T, kD, kPlain>, kThreads, params,
                                                        grads, vector, stream);
}

template <typename T, int kD>
cudaError_t run_backward(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads, unsigned vector,
                         cudaStream_t stream) {
  return plain_scores(params.base) ? run_backward<T, kD, true>(params, grads, vector, stream)
                                    : run_backward<T, kD, false>(params, grads, vector, stream);
}

}  // namespace
}  // namespace attention_cuda

template <typename T>
cudaError_t launch_attention_backward(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                                      cudaStream_t stream) {
  using namespace attention_cuda;
  const AttentionParams& p = params.base;
  const cudaError_t supported = check_attention_call(p);
  if (supported != cudaSuccess) return supported;
  if (!score_grads_ok(p, grads)) return cudaErrorInvalidValue;
  // Empty sizes launch nothing; a non-empty grad is written in full (zeros where nothing reaches).
  const int64_t no_stride[3] = {0, 0, 0};
  const unsigned vector =
      input_vector_flags(params) | (vector_ok(grads.grad_o, no_stride) && p.v_dim % 8 == 0 ? kVectorGradO : 0u);
  // dS to grad_s is written by the dQ kernel, so asking for it takes the deterministic kernels.
  AttentionCudaGrads<T> chosen = grads;
  if (grads.grad_s != nullptr) chosen.dq_accum = nullptr;
  if (hopper_backward_applies(p)) return run_backward_sm90<T>(params, chosen, vector, stream);
  return with_head_dim_bucket(
      p, [&](auto bucket) { return run_backward<T, decltype(bucket)::value>(params, chosen, vector, stream); });
}

template cudaError_t launch_attention_backward<__half>(const AttentionCudaParams<__half>&,
                                                       const AttentionCudaGrads<__half>&, cudaStream_t);
template cudaError_t launch_attention_backward<__nv_bfloat16>(const AttentionCudaParams<__nv_bfloat16>&,
                                                              const AttentionCudaGrads<__nv_bfloat16>&,
                                                              cudaStream_t);

}  // namespace genfast
