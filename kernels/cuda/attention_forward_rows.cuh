// What the attention forward kernels (attention_forward.cu on mma.sync, attention_forward_sm90.cu on
// wgmma) do per score once a product is in registers: both hold S and O as mma.m16n8's C tiles, so
// a lane owns rows gid and gid + 8 of its warp's 16, columns 2 tig and 2 tig + 1 of each 8.
// ForwardRows keeps those two rows' online softmax (running maximum and sum), turns a block of raw
// dot products into probabilities (scores, band, dropout), rescales O, and writes the result.
#pragma once

#include "attention_tile.cuh"

namespace genfast {
namespace attention_cuda {

// The split results of a forward with splits > 1: o_s and lse_s of lse row r at [s rows + r]. Or a
// plan's float_o (one split): then the general kernels up to head dim kPrecisePvMaxHeadDim take P V
// with P in two parts of T (a_rest_from_c), since a mask gradient's delta, rowsum(dO o), would
// otherwise carry P's rounding to T, which the gradient's sum over the dims a mask broadcasts over
// gathers. At 256 the second part spilled 48 bytes (sm_90a).
constexpr int kPrecisePvMaxHeadDim = 128;
struct ForwardPartials {
  float* o;    // (splits, rows, v_dim)
  float* lse;  // (splits, rows)
  int64_t rows;
  bool precise_pv;
};

template <int kBlockM, int kBlockN, bool kPlain>
struct ForwardRows {
  const AttentionParams& p;
  const QueryTile<kBlockM, kBlockN>& work;
  int64_t row_h[2];
  int row_i[2];
  int64_t mask_row[2] = {0, 0};  // attention_mask_row of the two rows, with a mask read from global memory
  int tig;
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.0f, 0.0f};
  Dropout drop;

  // The rows of the lane of `warp` (16 rows each) at `lane`; mask_staged: the caller stages the
  // mask (step's StagedMask), so that the rows' offsets into it in global memory are not needed.
  __device__ __forceinline__ ForwardRows(const AttentionParams& params, const QueryTile<kBlockM, kBlockN>& tile,
                                         int warp, int lane, bool mask_staged = false)
      : p(params), work(tile), tig(lane % 4), drop(kPlain ? Dropout{} : dropout_of(params)) {
    work.row(warp * 16 + lane / 4, row_h[0], row_i[0]);
    work.row(warp * 16 + lane / 4 + 8, row_h[1], row_i[1]);
    if (!kPlain && !mask_staged && p.mask_kind != AttentionMask::kNone) {
      for (int r = 0; r < 2; ++r) mask_row[r] = attention_mask_row(p, work.b, row_h[r], row_i[r]);
    }
  }

  // acc_s (raw q . k of keys j0 ..) becomes P, the block's unnormalized probabilities (dropped ones
  // zero); the running maximum and sum move on and acc_o is rescaled to the new maximum.
  template <int kST, int kOT>
  __device__ __forceinline__ void step(float (&acc_s)[kST][4], float (&acc_o)[kOT][4], int j0,
                                       const StagedMask& staged = StagedMask{}) {
    float alpha[2];
    probabilities(acc_s, j0, alpha, staged);
    rescale(acc_o, alpha);
  }

  // step without touching O, which a product may still be adding to: alpha, the factor that takes
  // each row's O to the new maximum, is for rescale once it has.
  template <int kST>
  __device__ __forceinline__ void probabilities(float (&acc_s)[kST][4], int j0, float (&alpha)[2],
                                                const StagedMask& staged = StagedMask{}) {
    const int q_len = work.q_len, k_len = work.k_len;
    const bool check = !block_inside(work.band, work.i0, work.rows_per_head, j0, kST * 8, k_len);
    // Plain scores stay unscaled: the scale (positive there) multiplies their maximum and is folded
    // into the exponent's FFMA, a multiply per score fewer.
    const float unit = kPlain ? p.scale : 1.0f;
    float block_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int t = 0; t < kST; ++t) {
      const bool read_staged = !kPlain && staged.on;
      uint32_t shown[2] = {0xffffu, 0xffffu};  // a pair of keys' bytes a row
      if (read_staged) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          shown[r] = *reinterpret_cast<const uint16_t*>(staged.at + r * 8 * staged.stride + t * 8 + 2 * tig);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float unused_cap;
        float s = score_at<kPlain, false, !kPlain>(p, work.seq, work.band, work.b, row_h[e / 2], acc_s[t][e],
                                                   row_i[e / 2], j0 + t * 8 + 2 * tig + (e & 1), q_len, k_len, check,
                                                   unused_cap, mask_row[e / 2], !read_staged);
        if (read_staged && ((shown[e / 2] >> (8 * (e & 1))) & 0xffu) == 0u) s = kNegInf;
        acc_s[t][e] = s;
        block_max[e / 2] = nan_max(block_max[e / 2], s);
      }
    }
    float scaled_max[2], block_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      block_max[r] = nan_max(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 1));
      block_max[r] = nan_max(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 2));
      const float new_max = nan_max(row_max[r], block_max[r] * unit);
      const float safe_max = new_max == kNegInf ? 0.0f : new_max;  // nothing seen yet: p = 0, alpha = 0
      alpha[r] = exp2_ftz((row_max[r] - safe_max) * kLog2e);
      row_max[r] = new_max;
      scaled_max[r] = safe_max * kLog2e;
    }
#pragma unroll
    for (int t = 0; t < kST; ++t) {
      bool keep[4] = {};
      if (!kPlain && drop.on) dropout_keeps<true>(p, work.seq, drop, row_h, row_i, j0 + t * 8, keep);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pe = exp2_ftz(fmaf(acc_s[t][e], unit * kLog2e, -scaled_max[e / 2]));
        block_sum[e / 2] += pe;
        if (!kPlain && drop.on) pe = keep[e] ? pe * drop.keep_scale : 0.0f;
        acc_s[t][e] = pe;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * alpha[r] + block_sum[r];
  }

  template <int kOT>
  __device__ __forceinline__ void rescale(float (&acc_o)[kOT][4], const float (&alpha)[2]) {
    // Once the rows' maxima settle (most steps of a long row) every alpha of the warp is 1: a vote
    // skips the multiplies (at head dim 128, 64 of the 541 instructions of a whole-tile step).
    if (!__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) return;
#pragma unroll
    for (int t = 0; t < kOT; ++t) {
      acc_o[t][0] *= alpha[0];
      acc_o[t][1] *= alpha[0];
      acc_o[t][2] *= alpha[1];
      acc_o[t][3] *= alpha[1];
    }
  }

  // o = acc / sum and lse = max + log(sum); a row that saw no key: o = 0, lse = -inf (with a sink,
  // lse takes it and o = acc e^(max - lse): kernels/common/attention.h). With splits
  // (or a plan's float_o: partials given for one split), the same in float32 for this CTA's split,
  // into `partials`.
  template <typename T, int kOT>
  __device__ __forceinline__ void finish(const AttentionCudaParams<T>& params, const float (&acc_o)[kOT][4],
                                         const QueryLayout& layout, const ForwardPartials& partials) {
    const int v_dim = static_cast<int>(p.v_dim);
    const bool pair_ok = (v_dim % 2) == 0;
    const bool split = partials.o != nullptr;
    const int64_t split_row0 = static_cast<int64_t>(blockIdx.x % layout.splits) * partials.rows;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int i = row_i[r];
      if (i >= work.q_len) continue;
      const int64_t h = row_h[r], lse_row = work.seq.lse_row(h, i);
      const bool seen = !(row_max[r] == kNegInf);  // NaN counts as seen
      float inverse = seen ? 1.0f / sum : 0.0f;
      float lse = seen ? row_max[r] + logf(sum) : kNegInf;
      // A head's sink joins its rows once: here when the keys are not split, else in the combine.
      if (p.sinks != nullptr && layout.splits == 1) {
        lse = attention_lse_with_sink(lse, p.sinks[h]);
        inverse = seen ? expf(row_max[r] - lse) : 0.0f;  // acc holds e^(s - max)
      }
      if (split) {
        if (tig == 0) partials.lse[split_row0 + lse_row] = lse;
        float* o_row = partials.o + (split_row0 + lse_row) * p.v_dim;
#pragma unroll
        for (int t = 0; t < kOT; ++t) {
          const int c = t * 8 + 2 * tig;
          if (c < v_dim) o_row[c] = seen ? acc_o[t][2 * r] * inverse : 0.0f;
          if (c + 1 < v_dim) o_row[c + 1] = seen ? acc_o[t][2 * r + 1] * inverse : 0.0f;
        }
        continue;
      }
      if (tig == 0) p.lse[lse_row] = lse;
      T* o_row = params.o + work.seq.out_row(h, i) * p.v_dim;
#pragma unroll
      for (int t = 0; t < kOT; ++t) {
        const int c = t * 8 + 2 * tig;
        if (c < v_dim) {
          const float lo = seen ? acc_o[t][2 * r] * inverse : 0.0f;
          const float hi = seen ? acc_o[t][2 * r + 1] * inverse : 0.0f;
          store_pair<T>(o_row, c, lo, hi, c + 1 < v_dim, pair_ok);
        }
      }
    }
  }
};

}  // namespace attention_cuda
}  // namespace genfast
