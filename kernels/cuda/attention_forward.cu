// Attention forward on tensor cores, FlashAttention-2 style: one CTA of 4 warps per (block of 64
// queries, batch * head); each warp owns 16 query rows. The CTA walks the key blocks its band can
// reach, staging K and V (double-buffered, cp.async) in padded shared memory next to Q, and keeps
// per row a running maximum, sum and output (online softmax) in the mma accumulators' registers.
//   S = Q K^T      A: Q (ldmatrix, pattern A)        B: K stored [key][dim] (pattern B)
//   O += P V       A: P (from S's C fragments)        B: V stored [key][dim] (pattern A, .trans)
// Head dims are bucketed (32, 64, 128, 256 on max(dim, v_dim)), the tail zero-padded; kPlain
// (no soft-cap, ALiBi, mask or dropout) keeps the per-score work to a scale and the band.
#include "attention.cuh"
#include "attention_tile.cuh"

namespace genfast {
namespace attention_cuda {
namespace {

template <int kD>
struct ForwardTile {
  static constexpr int kBlockM = 64;                    // 16 query rows per warp
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;   // keys per step
  static constexpr int kStride = kD + 8;                // shared row stride (elements)
  // Q, then K and V double-buffered.
  static constexpr int kSmemBytes = (kBlockM * kStride + KeyValueTiles<kBlockN, kD>::kElements) * 2;
  static_assert(kSmemBytes <= kMaxSmemBytes, "the forward's tiles must fit every sm_80+ GPU");
};

template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const __grid_constant__ AttentionCudaParams<T> params, int q_blocks, unsigned vector) {
  using Tile = ForwardTile<kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kStride = Tile::kStride;
  constexpr int kST = kBlockN / 8;  // S's n-tiles per warp
  constexpr int kOT = kD / 8;       // O's n-tiles per warp
  const AttentionParams& p = params.base;

  const QueryBlock<kBlockM, kBlockN> work(p, q_blocks);
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int64_t b = work.b, h = work.h;
  const AttentionSequence& seq = work.seq;
  const int i0 = work.i0, q_len = work.q_len, k_len = work.k_len;
  const Band band = work.band;
  const BlockRange blocks = work.blocks;
  const int dim = static_cast<int>(p.dim), v_dim = static_cast<int>(p.v_dim);

  extern __shared__ uint4 smem_raw[];
  uint16_t* s_q = reinterpret_cast<uint16_t*>(smem_raw);
  const KeyValueTiles<kBlockN, kD> kv(params, seq, b, work.hk, s_q + kBlockM * kStride, vector);

  load_tile<kBlockM, kD>(s_q, reinterpret_cast<const uint16_t*>(params.q) + attention_q_at(p, seq, b, h, i0),
                         p.q_stride[2], work.rows, dim, (vector & kVectorQ) != 0);
  if (blocks.count > 0) kv.load(blocks.first, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int a_row = lane % 16, a_col = (lane / 16) * 8;                 // pattern A
  const int b_row = lane % 8 + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;  // pattern B
  const int dim_steps = (dim + 15) / 16;
  const uint16_t* q_frag = s_q + (warp * 16 + a_row) * kStride + a_col;
  const int row_i[2] = {i0 + warp * 16 + gid, i0 + warp * 16 + gid + 8};

  float acc_o[kOT][4];
  zero(acc_o);
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.0f, 0.0f};
  const Dropout drop = kPlain ? Dropout{} : dropout_of(p);

  for (int n = 0; n < blocks.count; ++n) {
    const int buf = n & 1, j0 = (blocks.first + n) * kBlockN;
    if (n + 1 < blocks.count) {
      kv.load(blocks.first + n + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* k_tile = kv.k_tile(buf);
    const uint16_t* v_tile = kv.v_tile(buf);

    // S = Q K^T for the warp's 16 rows.
    float acc_s[kST][4];
    zero(acc_s);
    mma_a_bt<T, kD>(acc_s, q_frag, k_tile + b_row * kStride + b_col, dim_steps);

    // Scores, then the online softmax of the rows gid and gid + 8 (shared by the 4 lanes of a gid).
    const bool check = !block_inside(band, i0, kBlockM, j0, kBlockN, k_len);
    float block_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int t = 0; t < kST; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float unused_cap;
        const float s = score_at<kPlain, false>(p, seq, band, b, h, acc_s[t][e], row_i[e / 2],
                                                j0 + t * 8 + 2 * tig + (e & 1), q_len, k_len, check, unused_cap);
        acc_s[t][e] = s;
        block_max[e / 2] = nan_max(block_max[e / 2], s);
      }
    }
    float scaled_max[2], alpha[2], block_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      block_max[r] = nan_max(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 1));
      block_max[r] = nan_max(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 2));
      const float new_max = nan_max(row_max[r], block_max[r]);
      const float safe_max = new_max == kNegInf ? 0.0f : new_max;  // nothing seen yet: p = 0, alpha = 0
      alpha[r] = exp2f((row_max[r] - safe_max) * kLog2e);
      row_max[r] = new_max;
      scaled_max[r] = safe_max * kLog2e;
    }
#pragma unroll
    for (int t = 0; t < kST; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pe = exp2f(fmaf(acc_s[t][e], kLog2e, -scaled_max[e / 2]));
        block_sum[e / 2] += pe;
        if (!kPlain && drop.on) {
          const int i = row_i[e / 2], j = j0 + t * 8 + 2 * tig + (e & 1);
          const bool keep = i < q_len && j < k_len && attention_keeps(p, seq, drop.seed, drop.offset, h, i, j);
          pe = keep ? pe * drop.keep_scale : 0.0f;
        }
        acc_s[t][e] = pe;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * alpha[r] + block_sum[r];
#pragma unroll
    for (int t = 0; t < kOT; ++t) {
      acc_o[t][0] *= alpha[0];
      acc_o[t][1] *= alpha[0];
      acc_o[t][2] *= alpha[1];
      acc_o[t][3] *= alpha[1];
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a_from_c<T, kST>(a, acc_s, kk);
      mma_a_b<T>(acc_o, a, v_tile + (kk * 16 + a_row) * kStride + a_col, v_dim);
    }
    __syncthreads();  // the buffer is refilled by the next step's prefetch
  }
  cp_async_wait<0>();  // nothing is in flight past here (no key block: only Q's group)

  // o = acc / sum and lse = max + log(sum); a row that saw no key: o = 0, lse = -inf.
  const bool pair_ok = (v_dim % 2) == 0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int i = row_i[r];
    if (i >= q_len) continue;
    const bool seen = !(row_max[r] == kNegInf);  // NaN counts as seen
    const float inverse = seen ? 1.0f / sum : 0.0f;
    if (tig == 0) p.lse[seq.lse_row(h, i)] = seen ? row_max[r] + logf(sum) : kNegInf;
    T* o_row = params.o + seq.out_row(h, i) * p.v_dim;
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

template <typename T, int kD, bool kPlain>
cudaError_t run_forward(const AttentionCudaParams<T>& params, unsigned vector, cudaStream_t stream) {
  using Tile = ForwardTile<kD>;
  const AttentionParams& p = params.base;
  const int64_t q_blocks = (p.q_len + Tile::kBlockM - 1) / Tile::kBlockM;
  return launch_tiles(attention_forward_kernel<T, kD, kPlain>, q_blocks * p.batch * p.heads, kThreads,
                      Tile::kSmemBytes, stream, params, static_cast<int>(q_blocks), vector);
}

template <typename T, int kD>
cudaError_t run_forward(const AttentionCudaParams<T>& params, unsigned vector, cudaStream_t stream) {
  return plain_scores(params.base) ? run_forward<T, kD, true>(params, vector, stream)
                                    : run_forward<T, kD, false>(params, vector, stream);
}

}  // namespace
}  // namespace attention_cuda

template <typename T>
cudaError_t launch_attention_forward(const AttentionCudaParams<T>& params, cudaStream_t stream) {
  using namespace attention_cuda;
  const AttentionParams& p = params.base;
  const cudaError_t supported = check_attention_call(p);
  if (supported != cudaSuccess) return supported;
  if (p.batch <= 0 || p.q_len <= 0) return cudaSuccess;
  const unsigned vector = input_vector_flags(params);
  return with_head_dim_bucket(
      p, [&](auto bucket) { return run_forward<T, decltype(bucket)::value>(params, vector, stream); });
}

template cudaError_t launch_attention_forward<__half>(const AttentionCudaParams<__half>&, cudaStream_t);
template cudaError_t launch_attention_forward<__nv_bfloat16>(const AttentionCudaParams<__nv_bfloat16>&,
                                                             cudaStream_t);

}  // namespace genfast
