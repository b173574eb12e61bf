// Attention forward on tensor cores, FlashAttention-2 style: one CTA of 4 warps per tile of 64
// query rows (QueryLayout: one head's queries, or the few queries of several heads of one kv head
// stacked) and split of its key blocks; each warp owns 16 rows. The CTA walks its key blocks, staging
// K and V (double-buffered, cp.async) in padded shared memory next to Q, and keeps per row a running
// maximum, sum and output (online softmax) in the mma accumulators' registers.
//   S = Q K^T      A: Q (ldmatrix, pattern A)        B: K stored [key][dim] (pattern B)
//   O += P V       A: P (from S's C fragments)        B: V stored [key][dim] (pattern A, .trans)
// Head dims are bucketed (32, 64, 128, 256 on max(dim, v_dim)), the tail zero-padded; kPlain
// (no soft-cap, ALiBi, mask or dropout) keeps the per-score work to a scale and the band; a key
// block the mask hides from every row of the tile is skipped (mask_shows_any). Up to head dim 128 a
// bool mask's block is staged in shared memory with K and V (BoolMaskTiles; at 256 the tiles fill
// the 99 KiB), which both that test and the scores read.
// With splits, each CTA writes its rows' normalized partial output and log-sum-exp in float32, and
// attention_combine_kernel merges the splits of each row (flash-decoding):
//   lse = logsumexp_s lse_s,  o = sum_s exp(lse_s - lse) o_s.
#include <algorithm>
#include <cmath>

#include "attention.cuh"
#include "attention_forward_rows.cuh"
#include "attention_hopper.cuh"
#include "attention_mask_tile.cuh"
#include "attention_tile.cuh"

namespace genfast {
namespace attention_cuda {
namespace {

template <int kD, bool kPlain = true>
struct ForwardTile {
  static constexpr int kBlockM = 64;                    // 16 query rows per warp
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;   // keys per step
  static constexpr int kStride = kD + 8;                // shared row stride (elements)
  static constexpr bool kStagesMask = !kPlain && kD <= 128;
  using MaskTiles = BoolMaskTiles<kBlockM, kBlockN>;
  // Q, then K and V double-buffered, then a bool mask's blocks double-buffered.
  static constexpr int kMaskOffset = (kBlockM * kStride + KeyValueTiles<kBlockN, kD>::kElements) * 2;
  static constexpr int kSmemBytes = kMaskOffset + (kStagesMask ? MaskTiles::kBytes : 0);
  static_assert(kSmemBytes <= kMaxSmemBytes, "the forward's tiles must fit every sm_80+ GPU");
};

template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const __grid_constant__ AttentionCudaParams<T> params, QueryLayout layout,
                             ForwardPartials partials, unsigned vector) {
  using Tile = ForwardTile<kD, kPlain>;
  using MaskTiles = typename Tile::MaskTiles;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kStride = Tile::kStride;
  constexpr int kST = kBlockN / 8;  // S's n-tiles per warp
  constexpr int kOT = kD / 8;       // O's n-tiles per warp
  const AttentionParams& p = params.base;

  const QueryTile<kBlockM, kBlockN> work(p, layout);
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int64_t b = work.b;
  const AttentionSequence& seq = work.seq;
  const int q_len = work.q_len;
  const BlockRange blocks = work.blocks;
  const int dim = static_cast<int>(p.dim), v_dim = static_cast<int>(p.v_dim);

  extern __shared__ uint4 smem_raw[];
  uint16_t* s_q = reinterpret_cast<uint16_t*>(smem_raw);
  const KeyValueTiles<kBlockN, kD, false, kThreads, /*kPaged=*/true> kv(params, seq, b, work.hk,
                                                                        s_q + kBlockM * kStride, vector);
  const bool stage_mask = Tile::kStagesMask && p.mask_kind == AttentionMask::kBool;
  const MaskTiles mask_tiles(p, reinterpret_cast<uint8_t*>(smem_raw) + Tile::kMaskOffset, vector);
  const auto load_block = [&](int block, int buf) {
    kv.load(block, buf);
    if (stage_mask) mask_tiles.load(b, block * kBlockN, work.k_len, work, buf);
  };

  const uint16_t* q = reinterpret_cast<const uint16_t*>(params.q);
  load_rows<kBlockM, kD>(
      s_q,
      [&](int r) {
        int64_t h;
        int i;
        work.row(r, h, i);
        return i < q_len ? q + attention_q_at(p, seq, b, h, i) : static_cast<const uint16_t*>(nullptr);
      },
      dim, (vector & kVectorQ) != 0);
  cp_async_commit();
  if (blocks.count > 0) load_block(blocks.first, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int a_row = lane % 16, a_col = (lane / 16) * 8;                 // pattern A
  const int b_row = lane % 8 + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;  // pattern B
  const int dim_steps = (dim + 15) / 16;
  // At head dim 128 the warp's Q fragments stay in registers (32, which the 2 CTAs an SM's shared
  // memory holds can spare), an eighth of each step's ldmatrix; at 256 they would spill, and at 64
  // they would take the registers of an SM's fourth CTA.
  constexpr bool kQInRegisters = kD == 128;
  const uint16_t* q_frag = s_q + (warp * 16 + a_row) * kStride + a_col;
  uint32_t q_frags[kQInRegisters ? kD / 16 : 1][4];
  if constexpr (kQInRegisters) {
    cp_async_wait<1>();  // Q's group
    __syncthreads();
    load_a_fragments(q_frags, s_q, kStride, warp * 16, 0);
  }
  ForwardRows<kBlockM, kBlockN, kPlain> rows(p, work, warp, lane, stage_mask);
  const bool warp_busy = work.any_row(warp * 16, 16);  // stacked heads may leave whole warps empty

  float acc_o[kOT][4];
  zero(acc_o);

  for (int n = 0; n < blocks.count; ++n) {
    const int buf = n & 1, j0 = (blocks.first + n) * kBlockN;
    const bool shown = stage_block<kPlain>(
        n + 1 < blocks.count, [&] { load_block(blocks.first + n + 1, buf ^ 1); },
        [&] {
          if (stage_mask) return true;  // tested once staged, below
          // One head a tile (the usual case): rows without QueryTile::row's division per element.
          // Not in QueryTile::row itself, which spilled the Hopper d64 TMA forward (350 bytes), nor
          // at d256, whose registers the second copy spills (24 bytes).
          return kD < 256 && GENFAST_FAST_PATH(work.rows_per_head == kBlockM)
                     ? mask_shows_any<kBlockM, kBlockN>(p, b, j0, work.k_len, HeadQueries{work.h0, work.i0, work.q_len})
                     : mask_shows_any<kBlockM, kBlockN>(p, b, j0, work.k_len, work);
        },
        [] {}, [&] { return !stage_mask || mask_tiles.shown(buf); });
    if (!shown) continue;  // the mask hides the block from every row of the tile
    if (warp_busy) {
      const uint16_t* k_tile = kv.k_tile(buf);
      const uint16_t* v_tile = kv.v_tile(buf);

      // S = Q K^T for the warp's 16 rows.
      float acc_s[kST][4];
      zero(acc_s);
      if constexpr (kQInRegisters) {
        mma_a_bt<T, kD>(acc_s, q_frags, k_tile + b_row * kStride + b_col, dim_steps);
      } else {
        mma_a_bt<T, kD>(acc_s, q_frag, k_tile + b_row * kStride + b_col, dim_steps);
      }

      rows.step(acc_s, acc_o, j0,
                StagedMask{stage_mask, mask_tiles.tile(buf) + (warp * 16 + lane / 4) * MaskTiles::kStride,
                           MaskTiles::kStride});

      // O += P V.
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        // The rest of P (a float_o plan's) taken with P's rounding, before either product: taken
        // after the first, it kept S's tile alive through it (28 bytes of spills at d64, sm_80).
        constexpr bool kPrecisePv = !kPlain && kD <= kPrecisePvMaxHeadDim;
        const uint16_t* v_frag = v_tile + (kk * 16 + a_row) * kStride + a_col;
        uint32_t a[4], rest[4];
        a_from_c<T, kST>(a, acc_s, kk);
        if (kPrecisePv && partials.precise_pv) a_rest_from_c<T, kST>(rest, acc_s, kk);
        mma_a_b<T>(acc_o, a, v_frag, v_dim);
        if (kPrecisePv && partials.precise_pv) mma_a_b<T>(acc_o, rest, v_frag, v_dim);
      }
    }
    __syncthreads();  // the buffer is refilled by the next step's prefetch
  }
  cp_async_wait<0>();  // nothing is in flight past here (no key block: only Q's group)

  rows.finish(params, acc_o, layout, partials);
}

// One warp per lse row r: lse = logsumexp of the splits' lse_s (NaN when any is NaN, -inf when all
// are) and the head's sink, o = sum_s exp(lse_s - lse) o_s written to r's output row.
constexpr int kCombineRows = kThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_combine_kernel(const __grid_constant__ AttentionCudaParams<T> params, ForwardPartials partials,
                             int splits) {
  const AttentionParams& p = params.base;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kCombineRows + warp;
  if (r >= partials.rows) return;
  float most = kNegInf;
  for (int s = lane; s < splits; s += 32) most = nan_max(most, partials.lse[s * partials.rows + r]);
#pragma unroll
  for (int m = 1; m < 32; m *= 2) most = nan_max(most, __shfl_xor_sync(0xffffffffu, most, m));
  const bool seen = !(most == kNegInf);
  float total = 0.0f;
  for (int s = lane; s < splits; s += 32) total += seen ? expf(partials.lse[s * partials.rows + r] - most) : 0.0f;
#pragma unroll
  for (int m = 1; m < 32; m *= 2) total += __shfl_xor_sync(0xffffffffu, total, m);
  float lse = seen ? most + logf(total) : kNegInf;
  if (p.sinks != nullptr) {  // the row's head: dense rows are (b, h, i), packed ones (h, position)
    lse = attention_lse_with_sink(lse, p.sinks[p.cu_seqlens_q == nullptr ? r / p.q_len % p.heads : r / p.total_q]);
  }
  if (lane == 0) p.lse[r] = lse;
  // Dense lse rows are the output rows; packed ones are (h, position), output rows (position, h).
  const int64_t out = p.cu_seqlens_q == nullptr ? r : (r % p.total_q) * p.heads + r / p.total_q;
  T* o_row = params.o + out * p.v_dim;
  const int v_dim = static_cast<int>(p.v_dim);
  const bool pair_ok = (v_dim % 2) == 0;
  for (int c = 2 * lane; c < v_dim; c += 64) {
    float lo = 0.0f, hi = 0.0f;
    for (int s = 0; s < splits && seen; ++s) {
      const float weight = expf(partials.lse[s * partials.rows + r] - lse);
      const float* o_s = partials.o + (s * partials.rows + r) * p.v_dim;
      lo += weight * o_s[c];
      if (c + 1 < v_dim) hi += weight * o_s[c + 1];
    }
    store_pair<T>(o_row, c, lo, hi, c + 1 < v_dim, pair_ok);
  }
}

template <typename T, int kD, bool kPlain>
cudaError_t run_forward(const AttentionCudaParams<T>& params, const AttentionForwardPlan& plan, float* workspace,
                        unsigned vector, cudaStream_t stream) {
  using Tile = ForwardTile<kD, kPlain>;
  const AttentionParams& p = params.base;
  const QueryLayout layout = query_layout(p, Tile::kBlockM, plan.heads_per_cta, plan.splits);
  ForwardPartials partials{};
  partials.rows = attention_lse_rows(p);
  if (plan.splits > 1 || plan.float_o) {
    partials.lse = workspace;
    partials.o = workspace + plan.splits * partials.rows;
    partials.precise_pv = plan.float_o;
  }
  const cudaError_t status = launch_tiles(attention_forward_kernel<T, kD, kPlain>, query_layout_ctas(p, layout),
                                          kThreads, Tile::kSmemBytes, stream, params, layout, partials, vector);
  if (status != cudaSuccess || plan.splits == 1) return status;
  return launch_tiles(attention_combine_kernel<T>, (partials.rows + kCombineRows - 1) / kCombineRows, kThreads, 0,
                      stream, params, partials, plan.splits);
}

template <typename T, int kD>
cudaError_t run_forward(const AttentionCudaParams<T>& params, const AttentionForwardPlan& plan, float* workspace,
                        unsigned vector, cudaStream_t stream) {
  return plain_scores(params.base) ? run_forward<T, kD, true>(params, plan, workspace, vector, stream)
                                    : run_forward<T, kD, false>(params, plan, workspace, vector, stream);
}

}  // namespace
}  // namespace attention_cuda

AttentionForwardPlan plan_attention_forward(const AttentionParams& p, int multiprocessors) {
  using namespace attention_cuda;
  constexpr int kBlockM = ForwardTile<64>::kBlockM, kBlockN = ForwardTile<64>::kBlockN;
  AttentionForwardPlan plan;
  if (p.batch <= 0 || p.q_len <= 0 || p.kv_heads <= 0 || p.heads % p.kv_heads != 0) return plan;
  const int64_t group = p.heads / p.kv_heads;
  // The largest divisor of the group whose queries fit a tile (so that no tile holds fewer heads);
  // for packed sequences whose longest fits no such stack, the largest up to 16, a tile holding
  // kBlockM / heads queries of each head: q_len says nothing of the other sequences (mostly one query
  // each in a batch of decoding beside prefill), and tiles of one head would read each sequence's
  // keys once per head of the group. Not where the Hopper forward (tiles of one head) would run.
  const bool packed = p.cu_seqlens_q != nullptr && !hopper_forward_applies(p, AttentionForwardPlan{});
  for (int pass = 0; pass < (packed ? 2 : 1) && plan.heads_per_cta == 1; ++pass) {
    const int64_t most = pass == 0 ? kBlockM / p.q_len : kAttentionPackedStack;
    for (int64_t d = group < most ? group : most; d > 1; --d) {
      if (group % d == 0) {
        plan.heads_per_cta = static_cast<int>(d);
        break;
      }
    }
  }
  const int64_t tiles = query_layout_ctas(p, query_layout(p, kBlockM, plan.heads_per_cta, 1));
  const int64_t key_blocks = (p.k_len + kBlockN - 1) / kBlockN;
  const int64_t slots = 2 * static_cast<int64_t>(multiprocessors > 0 ? multiprocessors : 1);
  if (10 * tiles >= 8 * slots || key_blocks <= 1) return plan;
  // The fewest splits whose last wave is at least 85% as full as the best choice's; a count that
  // gives no split fewer key blocks than one split less is never taken.
  const int64_t most = std::min<int64_t>({kAttentionMaxSplits, key_blocks, slots});
  const auto fill = [&](int64_t s) {
    const double waves = static_cast<double>(tiles * s) / static_cast<double>(slots);
    return waves / std::ceil(waves);
  };
  const auto useful = [&](int64_t s) {
    return s == 1 || (key_blocks + s - 1) / s < (key_blocks + s - 2) / (s - 1);
  };
  double best = 0.0;
  for (int64_t s = 1; s <= most; ++s) best = useful(s) ? std::max(best, fill(s)) : best;
  for (int64_t s = 1; s <= most; ++s) {
    if (useful(s) && fill(s) >= 0.85 * best) {
      plan.splits = static_cast<int>(s);
      break;
    }
  }
  return plan;
}

int64_t attention_forward_workspace(const AttentionParams& p, const AttentionForwardPlan& plan) {
  return plan.splits > 1 || plan.float_o ? plan.splits * attention_lse_rows(p) * (p.v_dim + 1) : 0;
}

template <typename T>
cudaError_t launch_attention_forward(const AttentionCudaParams<T>& params, const AttentionForwardPlan& plan,
                                     float* workspace, cudaStream_t stream) {
  using namespace attention_cuda;
  const AttentionParams& p = params.base;
  const cudaError_t supported = check_attention_call(p);
  if (supported != cudaSuccess) return supported;
  if (p.batch <= 0 || p.q_len <= 0 || p.heads == 0) return cudaSuccess;
  if (plan.heads_per_cta < 1 || plan.heads_per_cta > ForwardTile<64>::kBlockM ||
      plan.heads_per_cta > p.heads / p.kv_heads || plan.splits < 1 || plan.splits > kAttentionMaxSplits ||
      ((plan.splits > 1 || plan.float_o) && workspace == nullptr) || (plan.float_o && plan.splits != 1)) {
    return cudaErrorInvalidValue;
  }
  const unsigned vector = input_vector_flags(params);
  if (hopper_forward_applies(p, plan)) return run_forward_sm90<T>(params, vector, stream);
  return with_head_dim_bucket(p, [&](auto bucket) {
    return run_forward<T, decltype(bucket)::value>(params, plan, workspace, vector, stream);
  });
}

template cudaError_t launch_attention_forward<__half>(const AttentionCudaParams<__half>&, const AttentionForwardPlan&,
                                                      float*, cudaStream_t);
template cudaError_t launch_attention_forward<__nv_bfloat16>(const AttentionCudaParams<__nv_bfloat16>&,
                                                             const AttentionForwardPlan&, float*, cudaStream_t);

}  // namespace genfast
