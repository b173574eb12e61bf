// genfast::attention_forward and attention_backward on the CPU, flash-style: each (batch, head,
// block of 128 queries) walks the blocks of 128 keys its band can reach (the last one, or a short
// sequence's only one, computed as wide as its keys), keeping a running maximum, sum and output per
// query (online softmax), so that no Lq x Lk matrix is stored; a key block's panels are packed once
// when several query blocks or heads read them. The backward recomputes the probabilities from the
// log-sum-exp, without atomics, in the fastest of three schedules (key_block_chunks): one pass per
// (batch, key head), one per chunk of a pair's key blocks, each with its own dQ accumulators (summed
// afterwards), or one pass per block of keys (dK, dV) and one per block of queries (dQ), which
// recomputes the scores. The products are register-blocked (block_product_rows) over packed
// panels, except for a few queries (decoding), which read K and V in place. The forward reads a
// float16 or bfloat16 K and V as they are, widening them in the loads that pack or read them (a KV
// cache is not copied to float32); the backward computes on float32 copies of its inputs.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../attention_args.h"
#include "aligned_floats.h"
#include "bfloat16_tiles.h"
#include "block_product.h"
#include "cpu_vectors.h"
#include "../../kernels/common/exp_lanes.h"
#include "float_io.h"
#include "philox_block.h"
#include "streaming_store.h"

namespace genfast {
namespace {

constexpr int64_t kQueryBlock = 128, kKeyBlock = 128;
static_assert(kKeyBlock % kCols == 0, "key blocks are whole panel chunks");

int64_t padded_to(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The columns of scores computed for a key block of cols keys: whole panel chunks, -inf (probability
// 0) past cols. A short sequence's block costs its keys, not kKeyBlock of them.
int64_t block_width(int64_t cols) { return padded_to(cols, kCols); }

// Panels are packed in column chunks of kCols: chunk k of a panel len deep holds its columns
// k * kCols .. k * kCols + kCols - 1, row after row (panel[t][c] at (c / kCols) * len * kCols + t *
// kCols + c % kCols), so that a product streams through contiguous memory (a whole-width row stride
// would put all the rows one tile reads in a few cache sets).

// Rows r0 .. r0 + Rows of multiply's product (those past count repeat its last row, unstored).
template <CpuCapability isa, int Rows>
GF_CPU_INLINE void multiply_rows(const float* a, int64_t a_row, int64_t a_step, int64_t r0, int64_t count,
                                 const float* panel, int64_t len, float* out, int64_t out_stride, int64_t width,
                                 bool accumulate, float factor) {
  const float* a_rows[Rows];
  for (int r = 0; r < Rows; ++r) a_rows[r] = a + std::min<int64_t>(r0 + r, count - 1) * a_row;
  int64_t c0 = 0;
  if constexpr (Rows <= kPairTileRows<isa>) {
    for (; c0 + 2 * kCols <= width; c0 += 2 * kCols) {
      block_product_pair_to<isa, Rows>(a_rows, a_step, panel + c0 * len, panel + (c0 + kCols) * len, kCols, len,
                                       count - r0, out + r0 * out_stride + c0, out_stride, accumulate, factor);
    }
  }
  for (; c0 < width; c0 += kCols) {
    block_product_to<isa, Rows>(a_rows, a_step, panel + c0 * len, kCols, len, count - r0, out + r0 * out_stride + c0,
                                out_stride, accumulate, factor);
  }
}

// out[r][c] (+)= factor * sum_t a[r * a_row + t * a_step] * panel[t][c] for r < count and c < width (a
// multiple of kCols); the panel len deep; out rows out_stride apart. Tiles of kPairTileRows rows
// over two panels (AVX-512) or kTileRows over one, fewer for the last rows, so that a single query
// (decoding) does not cost a whole tile.
template <CpuCapability isa>
GF_CPU_INLINE void multiply_for(const float* a, int64_t a_row, int64_t a_step, int64_t count, const float* panel,
                                int64_t len, float* out, int64_t out_stride, int64_t width, bool accumulate,
                                float factor) {
  constexpr int kTile = kPairTileRows<isa> > 0 ? kPairTileRows<isa> : kTileRows<isa>;
  int64_t r0 = 0;
  for (; r0 + kTile <= count; r0 += kTile) {
    multiply_rows<isa, kTile>(a, a_row, a_step, r0, count, panel, len, out, out_stride, width, accumulate, factor);
  }
  if constexpr (kTile >= 8) {  // 5 to 7 rows left: one pass of 8, not two
    for (; r0 + 4 < count; r0 += 8) {
      multiply_rows<isa, 8>(a, a_row, a_step, r0, count, panel, len, out, out_stride, width, accumulate, factor);
    }
  }
  if constexpr (kTile > 4) {
    for (; r0 + 1 < count; r0 += 4) {
      multiply_rows<isa, 4>(a, a_row, a_step, r0, count, panel, len, out, out_stride, width, accumulate, factor);
    }
  }
  for (; r0 < count; ++r0) {
    multiply_rows<isa, 1>(a, a_row, a_step, r0, count, panel, len, out, out_stride, width, accumulate, factor);
  }
}
GF_CPU_DISPATCH(multiply)

// Sixteen elements of K or V as float32: the forward reads a float16 or bfloat16 KV cache as it is,
// widening it in the loads that pack or read it, with no float32 copy of the cache.
template <CpuCapability isa>
GF_CPU_INLINE Floats<isa> load16_of(const float* src) {
  return load16<kVectorLanes<isa>>(src);
}
template <CpuCapability isa>
GF_CPU_INLINE Floats<isa> load16_of(const c10::Half* src) {
  return load16_float16<kVectorLanes<isa>>(reinterpret_cast<const uint16_t*>(src));
}
template <CpuCapability isa>
GF_CPU_INLINE Floats<isa> load16_of(const c10::BFloat16* src) {
  return load16_bfloat16<kVectorLanes<isa>>(reinterpret_cast<const uint16_t*>(src));
}

// The n <= kCols elements at src as floats, zeros after them.
template <CpuCapability isa, typename T>
GF_CPU_INLINE Floats<isa> load_partial(const T* src, int64_t n) {
  if (n == kCols) return load16_of<isa>(src);
  float x[kCols] = {};
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(src[i]);
  return load16<kVectorLanes<isa>>(x);
}

// The panel total deep and width wide (a multiple of kCols) whose row c is src[c * stride + d] for c <
// count, d < dim; zeros elsewhere.
template <CpuCapability isa, typename T>
GF_CPU_INLINE void pack_rows_for(const T* src, int64_t stride, int64_t count, int64_t dim, float* panel,
                                 int64_t width, int64_t total) {
  for (int64_t d0 = 0; d0 < width; d0 += kCols) {
    const int64_t n = std::clamp<int64_t>(dim - d0, 0, kCols);
    float* chunk = panel + d0 * total;
    for (int64_t c = 0; c < total; ++c) {
      store16(chunk + c * kCols, c < count ? load_partial<isa>(src + c * stride + d0, n) : Floats<isa>{});
    }
  }
}
GF_CPU_DISPATCH(pack_rows)

// The transpose of a block of count rows: the panel dim deep and width wide whose column c is
// src[c * stride + d] for c < count, zeros beyond; 16 x 16 blocks transposed in registers.
template <CpuCapability isa, typename T>
GF_CPU_INLINE void pack_transposed_for(const T* src, int64_t stride, int64_t count, int64_t dim, float* panel,
                                       int64_t width) {
  for (int64_t c0 = 0; c0 < width; c0 += kCols) {
    const int64_t keys = std::clamp<int64_t>(count - c0, 0, kCols);
    float* chunk = panel + c0 * dim;
    for (int64_t d0 = 0; d0 < dim; d0 += kCols) {
      const int64_t n = std::min<int64_t>(kCols, dim - d0);
      Floats<isa> block[kCols];
      for (int64_t c = 0; c < kCols; ++c) {
        block[c] = c < keys ? load_partial<isa>(src + (c0 + c) * stride + d0, n) : Floats<isa>{};
      }
      transpose16(block);
      for (int64_t d = 0; d < n; ++d) store16(chunk + (d0 + d) * kCols, block[d]);
    }
  }
}
GF_CPU_DISPATCH(pack_transposed)

// The row's maximum, NaN if any element is NaN; n a multiple of kCols.
template <CpuCapability isa>
GF_CPU_INLINE float row_max(const float* __restrict s, int64_t n) {
  Floats<isa> m = splat16<kVectorLanes<isa>>(-__builtin_inff()), nan = {};
  for (int64_t c = 0; c < n; c += kCols) {
    const Floats<isa> x = load16<kVectorLanes<isa>>(s + c);
    m = larger(m, x);
    nan = keep_nan(nan, x);
  }
  const float any_nan = reduce_lanes(nan, AddLanes());  // NaN exactly when a lane holds one
  return any_nan != any_nan ? any_nan : reduce_lanes(m, LargerLanes());
}

#if GF_HAS_EXP_LANES
// The sum of a register's lanes, in reduce_lanes' tree (exp_shifted's order).
GF_CPU_TARGET_AVX512 GF_CPU_INLINE float sum_of_lanes(__m512 sum) {
  Floats<CpuCapability::kAvx512> lanes;
  memcpy(&lanes, &sum, sizeof(lanes));
  return reduce_lanes(lanes, AddLanes());
}

// exp_shifted's loop with AVX-512, on exp_nonpositive_lanes.
GF_CPU_TARGET_AVX512 float exp_shifted_lanes(float* __restrict s, float m, int64_t n) {
  const __m512 shift = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += kCols) {
    const __m512 e = exp_nonpositive_lanes(_mm512_sub_ps(_mm512_loadu_ps(s + c), shift));
    _mm512_storeu_ps(s + c, e);
    sum = _mm512_add_ps(sum, e);
  }
  return sum_of_lanes(sum);
}
#endif

// s = exp(s - m) in place; returns the sum, taken in kCols interleaved lanes (an in-order float sum
// is a chain of dependent scalar adds) in the same pass, not a second one over s; n a multiple of
// kCols.
template <CpuCapability isa>
GF_CPU_INLINE float exp_shifted(float* __restrict s, float m, int64_t n) {
#if GF_HAS_EXP_LANES
  if constexpr (isa == CpuCapability::kAvx512) return exp_shifted_lanes(s, m, n);
#endif
  alignas(64) float lanes[kCols] = {};
  for (int64_t c0 = 0; c0 < n; c0 += kCols) {
#pragma GCC unroll 16
    for (int64_t j = 0; j < kCols; ++j) {
      const float e = exp_nonpositive(s[c0 + j] - m);
      s[c0 + j] = e;
      lanes[j] += e;
    }
  }
  return reduce_lanes(load16<kVectorLanes<isa>>(lanes), AddLanes());
}

#if GF_HAS_EXP_LANES && GF_HAS_BFLOAT16_PAIRS
// exp_shifted's exponentials, to a relative 2e-7 (exp_nonpositive_lanes_coarse), rounded to bfloat16
// (as round_rows_to_pairs rounds) into `rounded` instead of written back to s: P for the products on
// bfloat16 pairs, without a pass over float32 P. Returns the sum of the float32 values, taken in
// exp_shifted's order.
GF_CPU_TARGET_AVX512_BF16 float exp_shifted_rounded(const float* __restrict s, float m, int64_t n,
                                                    uint16_t* __restrict rounded) {
  const __m512 shift = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 2 * kCols <= n; c += 2 * kCols) {
    const __m512 lower = exp_nonpositive_lanes_coarse(_mm512_sub_ps(_mm512_loadu_ps(s + c), shift));
    const __m512 upper = exp_nonpositive_lanes_coarse(_mm512_sub_ps(_mm512_loadu_ps(s + c + kCols), shift));
    sum = _mm512_add_ps(_mm512_add_ps(sum, lower), upper);
    const __m512bh pair = _mm512_cvtne2ps_pbh(upper, lower);
    _mm512_storeu_si512(rounded + c, reinterpret_cast<const __m512i&>(pair));
  }
  if (c < n) {  // n is a multiple of kCols: one register left
    const __m512 e = exp_nonpositive_lanes_coarse(_mm512_sub_ps(_mm512_loadu_ps(s + c), shift));
    sum = _mm512_add_ps(sum, e);
    const __m256bh half = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(rounded + c), reinterpret_cast<const __m256i&>(half));
  }
  return sum_of_lanes(sum);
}
#endif

GF_CPU_INLINE void scale_row(float* __restrict r, float factor, int64_t n) {
  for (int64_t c = 0; c < n; ++c) r[c] *= factor;
}

// The online softmax's step for a block of scores (rows x width, rows kKeyBlock apart): each row's
// running maximum, sum and output acc (v_pad wide) rescaled to the new maximum, and the scores
// replaced by their exponentials (zeros while a row has seen nothing but -inf), or, where rounded is
// not null (a CPU with AVX512-BF16 only), the exponentials rounded to bfloat16 there instead (rows
// width apart). The rescale factors are taken in one loop over the rows, which vectorizes, instead of
// a latency-bound scalar exp per row.
template <CpuCapability isa>
GF_CPU_INLINE void online_softmax_step_for(float* scores, int64_t rows, int64_t width, float* max, float* sum,
                                           float* acc, int64_t v_pad, uint16_t* rounded) {
  float new_max[kQueryBlock], rescale[kQueryBlock];
  for (int64_t r = 0; r < rows; ++r) {
    const float block_max = row_max<isa>(scores + r * kKeyBlock, width);
    new_max[r] = (block_max > max[r] || block_max != block_max) ? block_max : max[r];
  }
  for (int64_t r = 0; r < rows; ++r) {  // 0 where the old maximum is -inf; 1 where nothing is seen yet
    rescale[r] = new_max[r] == -__builtin_inff() ? 1.0f : exp_nonpositive(max[r] - new_max[r]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * kKeyBlock;
    if (new_max[r] == -__builtin_inff()) {  // nothing seen yet: the block adds nothing
      if (rounded != nullptr) {
        for (int64_t c = 0; c < width; ++c) rounded[r * width + c] = 0;
      } else {
        for (int64_t c = 0; c < width; ++c) s[c] = 0.0f;
      }
      continue;
    }
    float block_sum;
#if GF_HAS_EXP_LANES && GF_HAS_BFLOAT16_PAIRS
    if constexpr (isa == CpuCapability::kAvx512) {  // no other entry point carries the AVX512-BF16 call
      block_sum = rounded != nullptr ? exp_shifted_rounded(s, new_max[r], width, rounded + r * width)
                                     : exp_shifted<isa>(s, new_max[r], width);
    } else
#endif
    {
      block_sum = exp_shifted<isa>(s, new_max[r], width);
    }
    // fma written out: whether the compiler contracts a * b + c here changed with inlining.
    sum[r] = std::fma(sum[r], rescale[r], block_sum);
    max[r] = new_max[r];
    scale_row(acc + r * v_pad, rescale[r], v_pad);
  }
}
GF_CPU_DISPATCH(online_softmax_step)

// A task with fewer query rows than this (its block's rows times its heads), or with one or two
// rows per head, reads K and V where they lie instead of packing panels: packing is a pass over K
// and V (and, for a long KV cache, a large buffer to fault in) that a few rows' products do not
// repay, as in decoding with a KV cache. (Measured with 4 heads per task: 1 and 2 rows are faster
// in place, 3 and more packed.)
constexpr int64_t kPackedRows = 8;
bool packs_panels(int64_t rows, int64_t heads) { return rows > 2 && rows * heads >= kPackedRows; }

// A decoding step of a grouped-query model (one query per head, the heads of a key head in one
// task) reads K and V in place with the heads' queries stacked as the rows of one product: each
// load of a key or value row, widened once from float16 or bfloat16, then serves every head.
bool stacks_heads(int64_t rows, int64_t heads) { return rows == 1 && heads > 1 && heads <= kQueryBlock; }

// Rows of the products that read K or V in place at a time, each load serving all of them.
template <CpuCapability isa>
constexpr int kInPlaceRows = isa == CpuCapability::kDefault ? 2 : 4;

// scores[r][c] = scale * q_r . k_c for r < Rows (q rows q_row apart; scores rows kKeyBlock apart)
// and c < cols, K in place (rows k_row apart); with Add, scores[r][c] += that (a template argument:
// the products without it compile as they did before it). The tail of each dot product is in lanes
// too: scalar code, which the compiler fuses for one dtype and not another, would round differently
// for float32 and for float16 or bfloat16 keys.
template <CpuCapability isa, int Rows, bool Add, typename T>
GF_CPU_INLINE void key_dot_rows(const float* q, int64_t q_row, const T* k, int64_t k_row, int64_t cols, int64_t dim,
                                float scale, float* scores) {
  const int64_t whole = dim / kCols * kCols, tail = dim - whole;
  Floats<isa> q_tail[Rows];
  for (int r = 0; r < Rows; ++r) q_tail[r] = load_partial<isa>(q + r * q_row + whole, tail);
  for (int64_t c = 0; c < cols; ++c) {
    const T* k_c = k + c * k_row;
    Floats<isa> lanes[Rows] = {};
    for (int64_t d = 0; d < whole; d += kCols) {
      const Floats<isa> key = load16_of<isa>(k_c + d);
      for (int r = 0; r < Rows; ++r) lanes[r] += load16<kVectorLanes<isa>>(q + r * q_row + d) * key;
    }
    if (tail > 0) {
      const Floats<isa> key = load_partial<isa>(k_c + whole, tail);
      for (int r = 0; r < Rows; ++r) lanes[r] += q_tail[r] * key;
    }
    for (int r = 0; r < Rows; ++r) {
      const float dot = scale * reduce_lanes(lanes[r], AddLanes());
      if constexpr (Add) {
        scores[r * kKeyBlock + c] += dot;
      } else {
        scores[r * kKeyBlock + c] = dot;
      }
    }
  }
}

// scores[r][c] (+)= scale * q_r . k_c for r < rows, c < cols, with K in place (rows k_row apart).
template <CpuCapability isa, bool Add, typename T>
GF_CPU_INLINE void key_dots_rows_for(const float* q, int64_t q_row, int64_t rows, const T* k, int64_t k_row,
                                     int64_t cols, int64_t dim, float scale, float* scores) {
  constexpr int kRows = kInPlaceRows<isa>;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    key_dot_rows<isa, kRows, Add>(q + r * q_row, q_row, k, k_row, cols, dim, scale, scores + r * kKeyBlock);
  }
  if (kRows > 2 && r + 2 <= rows) {
    key_dot_rows<isa, 2, Add>(q + r * q_row, q_row, k, k_row, cols, dim, scale, scores + r * kKeyBlock);
    r += 2;
  }
  if (r < rows) key_dot_rows<isa, 1, Add>(q + r * q_row, q_row, k, k_row, cols, dim, scale, scores + r * kKeyBlock);
}
template <CpuCapability isa, typename T>
GF_CPU_INLINE void key_dots_for(const float* q, int64_t q_row, int64_t rows, const T* k, int64_t k_row,
                                int64_t cols, int64_t dim, float scale, float* scores, bool add) {
  if (add) {
    key_dots_rows_for<isa, true>(q, q_row, rows, k, k_row, cols, dim, scale, scores);
  } else {
    key_dots_rows_for<isa, false>(q, q_row, rows, k, k_row, cols, dim, scale, scores);
  }
}
GF_CPU_DISPATCH(key_dots)

// acc_r[0 .. Chunks * kCols) += sum over c < cols of weights_r[c] * v_c[0 .. Chunks * kCols) for r <
// Rows (weights rows kKeyBlock apart, acc rows acc_row apart), c in order, v_c at v + c * v_row:
// each load of v_c serves every row, and the Rows x Chunks chains of FMAs fill the unit (a chain
// issues one FMA per 4 cycles).
template <CpuCapability isa, int Rows, int Chunks, typename T>
GF_CPU_INLINE void weighted_rows(const float* weights, const T* v, int64_t v_row, int64_t cols, float* acc,
                                 int64_t acc_row) {
  Floats<isa> sums[Rows][Chunks];
  for (int r = 0; r < Rows; ++r) {
    for (int i = 0; i < Chunks; ++i) sums[r][i] = load16<kVectorLanes<isa>>(acc + r * acc_row + i * kCols);
  }
  for (int64_t c = 0; c < cols; ++c) {
    for (int i = 0; i < Chunks; ++i) {
      const Floats<isa> value = load16_of<isa>(v + c * v_row + i * kCols);
      for (int r = 0; r < Rows; ++r) sums[r][i] += weights[r * kKeyBlock + c] * value;
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int i = 0; i < Chunks; ++i) store16(acc + r * acc_row + i * kCols, sums[r][i]);
  }
}

// weighted_rows<isa, Rows, 1> for the last n < kCols elements of the v_c (acc's rows are padded to
// kCols), in lanes as key_dot_rows' tail is, for the same reason.
template <CpuCapability isa, int Rows, typename T>
GF_CPU_INLINE void weighted_tail(const float* weights, const T* v, int64_t v_row, int64_t cols, int64_t n, float* acc,
                                 int64_t acc_row) {
  Floats<isa> sums[Rows];
  for (int r = 0; r < Rows; ++r) sums[r] = load16<kVectorLanes<isa>>(acc + r * acc_row);
  for (int64_t c = 0; c < cols; ++c) {
    const Floats<isa> value = load_partial<isa>(v + c * v_row, n);
    for (int r = 0; r < Rows; ++r) sums[r] += weights[r * kKeyBlock + c] * value;
  }
  for (int r = 0; r < Rows; ++r) store16(acc + r * acc_row, sums[r]);
}

// Chunks of 16 columns that weighted_rows takes at once for Rows rows: as many accumulators as
// leave room for the loads (16 of AVX-512's 32 registers, 8 of AVX2's or SSE's 16), at most 4.
template <CpuCapability isa, int Rows>
constexpr int kValueChunks =
    std::clamp((isa == CpuCapability::kAvx512 ? 16 : 8) / (Rows * (kCols / kVectorLanes<isa>)), 1, 4);

// value_sums for Rows rows.
template <CpuCapability isa, int Rows, typename T>
GF_CPU_INLINE void value_rows(const float* probs, const T* v, int64_t v_row, int64_t cols, int64_t v_dim, float* acc,
                              int64_t acc_row) {
  constexpr int kChunks = kValueChunks<isa, Rows>;
  int64_t d = 0;
  for (; d + kChunks * kCols <= v_dim; d += kChunks * kCols) {
    weighted_rows<isa, Rows, kChunks>(probs, v + d, v_row, cols, acc + d, acc_row);
  }
  for (; d + kCols <= v_dim; d += kCols) weighted_rows<isa, Rows, 1>(probs, v + d, v_row, cols, acc + d, acc_row);
  if (d < v_dim) weighted_tail<isa, Rows>(probs, v + d, v_row, cols, v_dim - d, acc + d, acc_row);
}

// acc[r][d] += sum over c < cols of probs[r][c] * v_c[d], c in order, with V in place (rows v_row
// apart); acc rows acc_row apart, padded to a multiple of kCols.
template <CpuCapability isa, typename T>
GF_CPU_INLINE void value_sums_for(const float* probs, int64_t rows, const T* v, int64_t v_row, int64_t cols,
                                  int64_t v_dim, float* acc, int64_t acc_row) {
  constexpr int kRows = kInPlaceRows<isa>;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    value_rows<isa, kRows>(probs + r * kKeyBlock, v, v_row, cols, v_dim, acc + r * acc_row, acc_row);
  }
  if (kRows > 2 && r + 2 <= rows) {
    value_rows<isa, 2>(probs + r * kKeyBlock, v, v_row, cols, v_dim, acc + r * acc_row, acc_row);
    r += 2;
  }
  if (r < rows) value_rows<isa, 1>(probs + r * kKeyBlock, v, v_row, cols, v_dim, acc + r * acc_row, acc_row);
}
GF_CPU_DISPATCH(value_sums)

// The keys [first, end) that queries [i0, i0 + rows) may see.
std::pair<int64_t, int64_t> key_range(const AttentionSequence& seq, int64_t i0, int64_t rows) {
  const int64_t first = std::max<int64_t>(0, seq.band_lo <= -kAttentionUnbounded ? 0 : i0 + seq.band_lo);
  const int64_t end =
      std::min<int64_t>(seq.k_len, seq.band_hi >= kAttentionUnbounded ? seq.k_len : i0 + rows + seq.band_hi);
  return {first, end};
}

// The queries [first, end) that may see keys [j0, j0 + cols).
std::pair<int64_t, int64_t> query_range(const AttentionSequence& seq, int64_t j0, int64_t cols) {
  const int64_t first = std::max<int64_t>(0, seq.band_hi >= kAttentionUnbounded ? 0 : j0 - seq.band_hi);
  const int64_t end =
      std::min<int64_t>(seq.q_len, seq.band_lo <= -kAttentionUnbounded ? seq.q_len : j0 + cols - seq.band_lo);
  return {first, end};
}

// A row of scores s under a boolean mask's row m (stride apart): -inf where m is false.
template <CpuCapability isa>
GF_CPU_INLINE void apply_bool_mask_for(const uint8_t* __restrict m, int64_t stride, int64_t cols, float* __restrict s) {
  if (stride == 1) {
    for (int64_t c = 0; c < cols; ++c) s[c] = m[c] != 0 ? s[c] : -__builtin_inff();
  } else {
    for (int64_t c = 0; c < cols; ++c) s[c] = m[c * stride] != 0 ? s[c] : -__builtin_inff();
  }
}
GF_CPU_DISPATCH(apply_bool_mask)

// A row of scores s (block_width(cols) wide) plus an additive mask's row m (stride apart) of float32, float16
// or bfloat16, read as it is.
template <CpuCapability isa, typename M>
GF_CPU_INLINE void add_bias_row_for(const M* __restrict m, int64_t stride, int64_t cols, float* __restrict s) {
  if (stride == 1) {
    for (int64_t c = 0; c < cols; c += kCols) {
      store16(s + c, load16<kVectorLanes<isa>>(s + c) + load_partial<isa>(m + c, std::min<int64_t>(kCols, cols - c)));
    }
  } else {
    for (int64_t c = 0; c < cols; ++c) s[c] += static_cast<float>(m[c * stride]);
  }
}
GF_CPU_DISPATCH(add_bias_row)

// visit(m), m the additive mask's elements from `at` in their type (p.bias_type).
template <typename Visit>
decltype(auto) visit_bias(const AttentionParams& p, int64_t at, const Visit& visit) {
  switch (p.bias_type) {
    case AttentionBias::kFloat16:
      return visit(static_cast<const c10::Half*>(p.mask) + at);
    case AttentionBias::kBFloat16:
      return visit(static_cast<const c10::BFloat16*>(p.mask) + at);
    default:
      return visit(static_cast<const float*>(p.mask) + at);
  }
}

// Whether a mask's row m (stride apart) hides all of cols keys: false everywhere, or -inf (NaN is not).
template <CpuCapability isa>
GF_CPU_INLINE bool bool_row_hides_all_for(const uint8_t* __restrict m, int64_t stride, int64_t cols) {
  uint8_t any = 0;
  if (stride == 1) {
    for (int64_t c = 0; c < cols; ++c) any |= m[c];
  } else {
    for (int64_t c = 0; c < cols; ++c) any |= m[c * stride];
  }
  return any == 0;
}
GF_CPU_DISPATCH(bool_row_hides_all)
template <CpuCapability isa, typename M>
GF_CPU_INLINE bool bias_row_hides_all_for(const M* __restrict m, int64_t stride, int64_t cols) {
  int visible = 0;
  if (stride == 1) {
    for (int64_t c = 0; c < cols; ++c) visible |= !(static_cast<float>(m[c]) == -__builtin_inff());
  } else {
    for (int64_t c = 0; c < cols; ++c) visible |= !(static_cast<float>(m[c * stride]) == -__builtin_inff());
  }
  return visible == 0;
}
GF_CPU_DISPATCH(bias_row_hides_all)

// A row of scores s (width wide) soft-capped as attention_score does it, softcap * tanh(s / softcap);
// slope, when given, gets the cap's derivative 1 - tanh^2 for the backward.
template <CpuCapability isa>
GF_CPU_INLINE void soft_cap_row_for(float* __restrict s, int64_t width, float softcap, float* __restrict slope) {
  float t;  // per element; soft_capped writes it
  if (slope == nullptr) {
    for (int64_t c = 0; c < width; ++c) s[c] = soft_capped(s[c], softcap, t);
    return;
  }
  for (int64_t c = 0; c < width; ++c) {
    s[c] = soft_capped(s[c], softcap, t);
    slope[c] = 1.0f - t * t;
  }
}
GF_CPU_DISPATCH(soft_cap_row)

// A row of scores s minus ALiBi's slope * |distance0 - c| (attention_score's bias, distance0 the
// first column's). Distances fit int32: they are under a sequence's length.
template <CpuCapability isa>
GF_CPU_INLINE void alibi_row_for(float* __restrict s, int64_t cols, float slope, int64_t distance0) {
  const int32_t first = static_cast<int32_t>(distance0);
  for (int32_t c = 0; c < static_cast<int32_t>(cols); ++c) s[c] -= alibi_bias(slope, first - c);
}
GF_CPU_DISPATCH(alibi_row)

// The element of the mask for query i of head h in batch b against key j.
int64_t mask_at(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  return b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3];
}

// How many rows ahead of the one it reads finish_scores asks for the mask's. A block's part of a
// mask is short runs (cols elements) a whole mask row apart, which the hardware prefetchers, stopping
// at a 4 KiB page's edge, do not follow: read cold, a (1, H, L, L) bfloat16 bias cost a sixth of the
// forward. A block's first rows are asked for before its score products (asking for all of its rows
// there stalled on the misses outstanding).
constexpr int64_t kMaskRowsAhead = 16;

// Asks for `rows` of the mask's rows (cols elements each, from element `at`) to be brought into
// cache; for a mask contiguous along keys. Always inlined: GCC takes a function that only prefetches
// for pure, and drops its calls.
inline __attribute__((always_inline)) void prefetch_mask_rows(const AttentionParams& p, int64_t at, int64_t rows,
                                                              int64_t cols) {
  if (p.mask_kind == AttentionMask::kNone || p.mask_stride[3] != 1) return;
  const int64_t size = p.mask_kind == AttentionMask::kBool ? 1 : p.bias_type == AttentionBias::kFloat32 ? 4 : 2;
  constexpr uintptr_t kLine = 64;
  for (int64_t r = 0; r < (p.mask_stride[2] == 0 ? 1 : rows); ++r) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(p.mask) + (at + r * p.mask_stride[2]) * size;
    for (uintptr_t line = start & ~(kLine - 1); line < start + cols * size; line += kLine) {
      __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 3);
    }
  }
}

// Scores s (rows x block_width(cols), already scale q.k) of queries i0.. against keys j0..j0 + cols:
// soft-cap, ALiBi, mask, band and the block's tail (-inf), attention_score's steps in its order, a
// row at a time in vector lanes. With softcap, cap_slope gets 1 - tanh^2.
void finish_scores(const AttentionParams& p, const AttentionSequence& seq, int64_t b, int64_t h, int64_t i0,
                   int64_t rows, int64_t j0, int64_t cols, float* scores, float* cap_slope) {
  const int64_t width = block_width(cols);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* s = scores + r * kKeyBlock;
    if (p.softcap > 0.0f) {
      soft_cap_row(s, width, p.softcap, cap_slope == nullptr ? nullptr : cap_slope + r * kKeyBlock);
    }
    if (p.alibi_slopes != nullptr) {
      alibi_row(s, cols, p.alibi_slopes[b * p.alibi_batch_stride + h], i + (seq.k_len - seq.q_len) - j0);
    }
    if (p.mask_kind != AttentionMask::kNone) {
      const int64_t at = mask_at(p, b, h, i, j0);
      if (r + kMaskRowsAhead < rows && p.mask_stride[2] != 0) {
        prefetch_mask_rows(p, at + kMaskRowsAhead * p.mask_stride[2], 1, cols);
      }
      if (p.mask_kind == AttentionMask::kBool) {
        apply_bool_mask(static_cast<const uint8_t*>(p.mask) + at, p.mask_stride[3], cols, s);
      } else {
        visit_bias(p, at, [&](const auto* m) { add_bias_row(m, p.mask_stride[3], cols, s); });
      }
    }
    const int64_t lo = seq.band_lo <= -kAttentionUnbounded ? 0 : std::clamp<int64_t>(i + seq.band_lo - j0, 0, cols);
    const int64_t hi =
        seq.band_hi >= kAttentionUnbounded ? cols : std::clamp<int64_t>(i + seq.band_hi - j0 + 1, 0, cols);
    std::fill(s, s + lo, -__builtin_inff());
    std::fill(s + std::max(lo, hi), s + width, -__builtin_inff());
  }
}

// Whether the mask hides keys j0 .. j0 + cols from every query i0 .. i0 + rows of head h (false, or
// an additive -inf): such a block adds nothing to any row or gradient, and is skipped, which makes a
// sliding-window, padding or document mask cost about the blocks it lets through.
bool block_masked_out(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                      int64_t cols) {
  if (p.mask_kind == AttentionMask::kNone) return false;
  const int64_t first = mask_at(p, b, h, i0, j0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = first + r * p.mask_stride[2];
    const bool hidden =
        p.mask_kind == AttentionMask::kBool
            ? bool_row_hides_all(static_cast<const uint8_t*>(p.mask) + row, p.mask_stride[3], cols)
            : visit_bias(p, row, [&](const auto* m) { return bias_row_hides_all(m, p.mask_stride[3], cols); });
    if (!hidden) return false;
  }
  return true;
}

// Dropout's factors of queries i0 .. i0 + rows of head h against keys j0 .. j0 + cols (attention_keeps):
// keep_scale where kept, else 0, and 0 past cols to block_width(cols); rows kKeyBlock apart.
void dropout_scales(const AttentionParams& p, const AttentionSequence& seq, uint64_t seed, uint64_t offset, int64_t h,
                    int64_t i0, int64_t rows, int64_t j0, int64_t cols, float* scales) {
  const float keep_scale = 1.0f / (1.0f - p.dropout_p);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scales + r * kKeyBlock;
    const uint64_t first = static_cast<uint64_t>(seq.lse_row(h, i0 + r) * seq.row_length + seq.col0 + j0);
    philox_dropout_scales(seed, offset, first, cols, p.dropout_p, keep_scale, row);
    std::fill(row + cols, row + block_width(cols), 0.0f);
  }
}

// values (rows x width, rows kKeyBlock apart) times their dropout factors: 0 where dropped, NaN included.
template <CpuCapability isa>
GF_CPU_INLINE void apply_dropout_scales_for(const float* __restrict scales, int64_t rows, int64_t width,
                                            float* __restrict values) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row_scales = scales + r * kKeyBlock;
    float* row = values + r * kKeyBlock;
    for (int64_t c = 0; c < width; ++c) row[c] = row_scales[c] != 0.0f ? row[c] * row_scales[c] : 0.0f;
  }
}
GF_CPU_DISPATCH(apply_dropout_scales)

// A row of floats x rounded to bfloat16 (their bits) as c10::BFloat16 rounds them, to nearest even
// and NaN to 0x7FC0, in vector lanes (c10's conversion, compiled for the baseline, is element by
// element).
template <CpuCapability isa>
GF_CPU_INLINE void round_row_to_bfloat16_for(const float* __restrict x, int64_t n, uint16_t* __restrict out) {
  for (int64_t c = 0; c < n; ++c) {
    uint32_t bits;
    __builtin_memcpy(&bits, x + c, sizeof(bits));
    const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    out[c] = x[c] != x[c] ? uint16_t{0x7FC0} : rounded;
  }
}
GF_CPU_DISPATCH(round_row_to_bfloat16)

// n floats from src written from element `at` of a tensor of `type` (float32, float64, float16 or
// bfloat16), rounded as c10 rounds them; float32 with streaming stores where `stream`.
void store_floats(void* base, at::ScalarType type, int64_t at, const float* src, int64_t n, bool stream = false) {
  switch (type) {
    case at::kHalf:
      return from_float(src, static_cast<c10::Half*>(base) + at, n);
    case at::kBFloat16:
      return round_row_to_bfloat16(src, n, static_cast<uint16_t*>(base) + at);
    case at::kDouble:
      return from_float(src, static_cast<double*>(base) + at, n);
    default:
      if (stream) return streaming_store(static_cast<float*>(base) + at, src, n);
      std::copy(src, src + n, static_cast<float*>(base) + at);
  }
}

// n zeros (+0, all bits clear in every float type) from element `at` of a tensor of `type`.
void store_zeros(void* base, at::ScalarType type, int64_t at, int64_t n) {
  const int64_t size = static_cast<int64_t>(c10::elementSize(type));
  std::memset(static_cast<char*>(base) + at * size, 0, n * size);
}

// A task's state: the scores of one head's block, and the running output, maximum and sum of each
// of its heads' rows (head_rows per head: a block's queries, at most kQueryBlock). Sized to the
// rows a block has, so that a decoding step does not allocate and zero a 128-row block per call.
struct ForwardScratch {
  int64_t head_rows;
  // The panels only for a task that packs its own, the dropout factors only with dropout.
  AlignedFloats scores, drop, acc, max, sum, k_panel, v_panel;
  AlignedFloats o_row;        // a row of o before it is rounded to bfloat16
  std::vector<uint8_t> seen;  // per head: whether the mask lets the current key block through
  std::vector<std::byte> gathered;  // a key block that crosses pages (key_block)
  // With products on bfloat16 pairs: each head's queries, and one head's probabilities, as pairs.
  std::vector<uint32_t> q_pairs, p_pairs;
  // rows: the most queries of a block; width: the widest key block (block_width). The scores also
  // hold a row per head for the stacked decoding step, which a packed sequence of one query may take
  // beside longer ones.
  ForwardScratch(int64_t rows, int64_t width, int64_t dim, int64_t v_pad, int64_t heads, bool packs, bool dropout,
                 bool pairs)
      : head_rows(rows),
        scores(static_cast<size_t>(std::max(rows, std::min(heads, kQueryBlock)) * kKeyBlock)),
        drop(dropout ? static_cast<size_t>(rows * kKeyBlock) : 0), acc(static_cast<size_t>(heads * rows * v_pad)),
        max(static_cast<size_t>(heads * rows)), sum(static_cast<size_t>(heads * rows)),
        k_panel(packs ? static_cast<size_t>(dim * width) : 0), v_panel(packs ? static_cast<size_t>(width * v_pad) : 0),
        o_row(static_cast<size_t>(v_pad)), seen(static_cast<size_t>(heads)),
        q_pairs(pairs ? static_cast<size_t>(heads * rows * (dim / 2)) : 0),
        p_pairs(pairs ? static_cast<size_t>(rows * width / 2) : 0) {}
};

// Where the forward writes o: float32, or bfloat16 rounded as each row is finished (no float32 o to
// round afterwards).
struct OutputRows {
  void* data;
  at::ScalarType type;
};

// K and V as the forward reads them: float32, or a float16 or bfloat16 cache's own elements. With
// pairs (bfloat16 only), the products over packed panels take bfloat16 pairs (bfloat16_pairs.h).
template <typename T>
struct KeysValues {
  const T* k;
  const T* v;
  bool pairs = false;
};

// Whether a bfloat16 forward's products over packed panels take bfloat16 pairs: on a CPU with
// AVX512-BF16 and for a head dim of whole pairs. Q is bfloat16 already; P is rounded to bfloat16 for
// P V, as the GPU kernels round it, while the row sums stay those of the float32 P.
bool takes_pairs(const AttentionParams& p) {
  return GF_HAS_BFLOAT16_PAIRS && cpu_capability() >= CpuCapability::kAvx512Bf16 && p.dim % 2 == 0;
}

// Whether the backward multiplies on bfloat16 pairs, reading q, k, v and grad_o as they are (no
// float32 copies): bfloat16 inputs, head dims of whole pairs, AVX512-BF16.
bool backward_takes_pairs(const at::Tensor& q, const at::Tensor& v) {
  return GF_HAS_BFLOAT16_PAIRS && cpu_capability() >= CpuCapability::kAvx512Bf16 &&
         q.scalar_type() == at::kBFloat16 && q.size(-1) % 2 == 0 && v.size(-1) % 2 == 0;
}

// Key block j0's cols rows of K and V as the forward reads them: in place, k_row and v_row elements
// apart, or, for a block that crosses pages of a paged cache, copied row by row into `gathered`
// (cols x dim, then cols x v_dim; one buffer a thread, grown as needed).
template <typename T>
struct KeyBlock {
  const T* k;
  int64_t k_row;
  const T* v;
  int64_t v_row;
};
template <typename T>
KeyBlock<T> key_block(const AttentionParams& p, const KeysValues<T>& kv, const AttentionSequence& seq, int64_t b,
                      int64_t hk, int64_t j0, int64_t cols, std::vector<std::byte>& gathered) {
  if (attention_block_in_one_page(p, j0, cols)) {
    return {kv.k + attention_k_at(p, seq, b, hk, j0), p.k_stride[2], kv.v + attention_v_at(p, seq, b, hk, j0),
            p.v_stride[2]};
  }
  gathered.resize(std::max<size_t>(gathered.size(), static_cast<size_t>(cols * (p.dim + p.v_dim)) * sizeof(T)));
  T* k = reinterpret_cast<T*>(gathered.data());
  T* v = k + cols * p.dim;
  for (int64_t c = 0; c < cols; ++c) {
    std::memcpy(k + c * p.dim, kv.k + attention_k_at(p, seq, b, hk, j0 + c), p.dim * sizeof(T));
    std::memcpy(v + c * p.v_dim, kv.v + attention_v_at(p, seq, b, hk, j0 + c), p.v_dim * sizeof(T));
  }
  return {k, p.dim, v, p.v_dim};
}

// Key block j0 as the in-place products (key_dots, value_sums) read it: runs of keys, run i keys c[i]
// .. c[i] + n[i] - 1 of the block, rows[i] their rows. One run, in place or key_block's copy, unless
// the block crosses pages of at least kCols keys: then a run a page, read in place (the copy cost
// vLLM's 16-key pages a fifth of a decoding step; products a few keys long would cost more than it).
// Run by run, the products add in the same order: the same sums, bit for bit.
template <typename T>
struct KeyRuns {
  static constexpr int kMost = kKeyBlock / kCols + 1;
  int count = 0;
  int64_t c[kMost], n[kMost];
  KeyBlock<T> rows[kMost];
};
template <typename T>
KeyRuns<T> key_runs(const AttentionParams& p, const KeysValues<T>& kv, const AttentionSequence& seq, int64_t b,
                    int64_t hk, int64_t j0, int64_t cols, std::vector<std::byte>& gathered) {
  KeyRuns<T> runs;
  if (p.page_size < kCols || attention_block_in_one_page(p, j0, cols)) {
    runs.count = 1;
    runs.c[0] = 0;
    runs.n[0] = cols;
    runs.rows[0] = key_block(p, kv, seq, b, hk, j0, cols, gathered);
    return runs;
  }
  for (int64_t c = 0; c < cols; c += runs.n[runs.count++]) {
    runs.c[runs.count] = c;
    runs.n[runs.count] = std::min(cols - c, p.page_size - (j0 + c) % p.page_size);
    runs.rows[runs.count] = key_block(p, kv, seq, b, hk, j0 + c, runs.n[runs.count], gathered);  // one page
  }
  return runs;
}

// key_dots and value_sums over a block's runs.
template <typename T>
void run_key_dots(const KeyRuns<T>& runs, const float* q, int64_t q_row, int64_t rows, int64_t dim, float scale,
                  float* scores) {
  for (int i = 0; i < runs.count; ++i) {
    key_dots(q, q_row, rows, runs.rows[i].k, runs.rows[i].k_row, runs.n[i], dim, scale, scores + runs.c[i], false);
  }
}
// The scores' qv part: scale * qv_r . v_c added, V read in place as run_key_dots reads K.
template <typename T>
void run_value_dots(const KeyRuns<T>& runs, const float* qv, int64_t qv_row, int64_t rows, int64_t v_dim, float scale,
                    float* scores) {
  for (int i = 0; i < runs.count; ++i) {
    key_dots(qv, qv_row, rows, runs.rows[i].v, runs.rows[i].v_row, runs.n[i], v_dim, scale, scores + runs.c[i], true);
  }
}
template <typename T>
void run_value_sums(const KeyRuns<T>& runs, const float* probs, int64_t rows, int64_t v_dim, float* acc,
                    int64_t acc_row) {
  for (int i = 0; i < runs.count; ++i) {
    value_sums(probs + runs.c[i], rows, runs.rows[i].v, runs.rows[i].v_row, runs.n[i], v_dim, acc, acc_row);
  }
}

// Key block j0's K^T panel (dim x width) and V panel (width x v_pad), width = block_width(cols): its
// cols keys, zeros past them.
template <typename T>
void pack_key_block(const AttentionParams& p, const KeysValues<T>& kv, const AttentionSequence& seq, int64_t b,
                    int64_t hk, int64_t j0, int64_t cols, float* k_panel, float* v_panel,
                    std::vector<std::byte>& gathered) {
  const int64_t width = block_width(cols);
  const KeyBlock<T> block = key_block(p, kv, seq, b, hk, j0, cols, gathered);
#if GF_HAS_BFLOAT16_PAIRS
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (kv.pairs) {  // the panels' words are bfloat16 pairs, in half their floats
      pack_pairs_transposed(reinterpret_cast<const uint16_t*>(block.k), block.k_row, cols, p.dim / 2,
                            reinterpret_cast<uint32_t*>(k_panel), width);
      pack_pairs_interleaved(reinterpret_cast<const uint16_t*>(block.v), block.v_row, cols, p.v_dim,
                             reinterpret_cast<uint32_t*>(v_panel), padded_to(p.v_dim, kCols), width);
      return;
    }
  }
#endif
  pack_transposed(block.k, block.k_row, cols, p.dim, k_panel, width);
  pack_rows(block.v, block.v_row, cols, p.v_dim, v_panel, padded_to(p.v_dim, kCols), width);
}

// The key blocks' panels of a run of (batch, key head) pairs, packed once for all the query blocks
// and heads that read them, when several do (else empty: each task packs the blocks it reads as it
// goes, in cache, without a buffer the size of K and V to allocate and fault in).
struct KeyPanels {
  int64_t k_blocks = 0, k_size = 0, v_size = 0, first_pair = 0;
  UninitializedFloats k, v;  // packing writes every panel that is read
  bool packed() const { return k != nullptr; }
  int64_t at(const AttentionParams& p, int64_t b, int64_t hk, int64_t block) const {
    return (b * p.kv_heads + hk - first_pair) * k_blocks + block;
  }
  const float* k_panel(const AttentionParams& p, int64_t b, int64_t hk, int64_t block) const {
    return k.get() + at(p, b, hk, block) * k_size;
  }
  const float* v_panel(const AttentionParams& p, int64_t b, int64_t hk, int64_t block) const {
    return v.get() + at(p, b, hk, block) * v_size;
  }
};

// At most this many floats (32 MiB) of panels at a time, or one pair's when they take more: a long
// KV cache is packed a few (batch, key head) pairs at a time rather than doubled in memory.
constexpr int64_t kPanelBudget = int64_t{8} << 20;

// The panels' sizes in floats, nothing allocated; bfloat16 pairs (words) take half as many.
KeyPanels key_panel_sizes(const AttentionParams& p, bool pairs) {
  KeyPanels panels;
  panels.k_blocks = (p.k_len + kKeyBlock - 1) / kKeyBlock;
  panels.k_size = p.dim * kKeyBlock / (pairs ? 2 : 1);
  panels.v_size = kKeyBlock * padded_to(p.v_dim, kCols) / (pairs ? 2 : 1);
  return panels;
}

// Whether a sequence's key blocks are packed into KeyPanels once for all its tasks: when it packs
// them at all and more than one task (query blocks times runs of heads) reads each. Decided per
// sequence: the decoding sequences of a packed batch, beside a prompt's chunk whose blocks are
// shared, read their keys in place (transformers' continuous batching mixes the two in a step).
bool shares_panels(const AttentionSequence& seq, int64_t heads, int64_t head_runs) {
  return packs_panels(seq.q_len, heads) && ((seq.q_len + kQueryBlock - 1) / kQueryBlock) * head_runs > 1;
}

// Packs the panels of pairs first_pair .. first_pair + pairs whose sequences share them.
template <typename T>
void pack_key_panels(const AttentionParams& p, const KeysValues<T>& kv, int64_t first_pair, int64_t pairs,
                     int64_t heads, KeyPanels& panels) {
  panels.first_pair = first_pair;
  at::parallel_for(0, pairs * panels.k_blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<std::byte> gathered;
    for (int64_t task = first; task < last; ++task) {
      const int64_t block = task % panels.k_blocks, pair = first_pair + task / panels.k_blocks;
      const int64_t b = pair / p.kv_heads, hk = pair % p.kv_heads, j0 = block * kKeyBlock;
      const AttentionSequence seq = attention_sequence(p, b);
      const int64_t cols = std::clamp<int64_t>(seq.k_len - j0, 0, kKeyBlock);
      // Past a packed sequence's end, or a sequence whose tasks pack or read in place: never read.
      if (cols == 0 || !shares_panels(seq, heads, p.heads / p.kv_heads / heads)) continue;
      pack_key_block(p, kv, seq, b, hk, j0, cols, panels.k.get() + task * panels.k_size,
                     panels.v.get() + task * panels.v_size, gathered);
    }
  });
}

// Scores (rows x block_width(cols)) of head h's queries i0 .. i0 + rows against key block j0, made its
// probabilities: attention_score's steps, the online softmax step on the running output, maximum and
// sum that forward_block keeps for the task's head e, and dropout. With `rounded` (bfloat16 pairs,
// rows block_width(cols) / 2 words apart) and without dropout, the probabilities go there rounded to
// bfloat16, not to scores; returns whether they did.
bool block_probabilities(const AttentionParams& p, const AttentionSequence& seq, uint64_t seed, uint64_t offset,
                         int64_t b, int64_t h, int64_t e, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                         float* scores, ForwardScratch& w, uint32_t* rounded = nullptr) {
  const int64_t v_pad = padded_to(p.v_dim, kCols);
  const int64_t width = block_width(cols);
  finish_scores(p, seq, b, h, i0, rows, j0, cols, scores, nullptr);
  uint16_t* const rounded_bits = GF_HAS_EXP_LANES && GF_HAS_BFLOAT16_PAIRS && p.dropout_p == 0.0f
                                     ? reinterpret_cast<uint16_t*>(rounded)
                                     : nullptr;
  online_softmax_step(scores, rows, width, w.max.data() + e * w.head_rows, w.sum.data() + e * w.head_rows,
                      w.acc.data() + e * w.head_rows * v_pad, v_pad, rounded_bits);
  if (rounded_bits != nullptr) return true;
  if (p.dropout_p > 0.0f) {
    dropout_scales(p, seq, seed, offset, h, i0, rows, j0, cols, w.drop.data());
    apply_dropout_scales(w.drop.data(), rows, width, scores);
  }
  return false;
}

// scores (rows x width) = scale * q K^T for head e's queries q against a packed K^T panel; on
// bfloat16 pairs with kv.pairs, from the queries forward_block rounded into w.q_pairs.
template <typename T>
void scores_from_panel(const AttentionParams& p, const KeysValues<T>& kv, const float* q, int64_t e, int64_t rows,
                       const float* k_panel, int64_t width, ForwardScratch& w) {
#if GF_HAS_BFLOAT16_PAIRS
  if (kv.pairs) {
    const int64_t pairs = p.dim / 2;
    multiply_pairs(pair_rows(w.q_pairs.data() + e * w.head_rows * pairs, pairs), rows,
                   reinterpret_cast<const uint32_t*>(k_panel), pairs, w.scores.data(), kKeyBlock, width, false,
                   p.scale);
    return;
  }
#endif
  multiply(q, p.q_stride[2], 1, rows, k_panel, p.dim, w.scores.data(), kKeyBlock, width, false, p.scale);
}

// acc (rows x v_pad) += the probabilities in w.scores (rows x width) times a packed V panel (width
// deep); on bfloat16 pairs with kv.pairs, the probabilities rounded to bfloat16 (into w.p_pairs, where
// they are already if `rounded`).
template <typename T>
void values_from_panel(const AttentionParams& p, const KeysValues<T>& kv, int64_t rows, const float* v_panel,
                       int64_t width, float* acc, ForwardScratch& w, bool rounded) {
  const int64_t v_pad = padded_to(p.v_dim, kCols);
#if GF_HAS_BFLOAT16_PAIRS
  if (kv.pairs) {
    const int64_t pairs = width / 2;
    if (!rounded) round_rows_to_pairs(w.scores.data(), kKeyBlock, rows, width, w.p_pairs.data(), pairs);
    multiply_pairs(pair_rows(w.p_pairs.data(), pairs), rows, reinterpret_cast<const uint32_t*>(v_panel), pairs, acc,
                   v_pad, v_pad, true, 1.0f);
    return;
  }
#endif
  multiply(w.scores.data(), kKeyBlock, 1, rows, v_panel, width, acc, v_pad, v_pad, true, 1.0f);
}

// Key block j0, read in place, for the one query of each of heads h0 .. h0 + heads (stacks_heads): row
// e of the scores is head h0 + e's, and its running output, maximum and sum are where forward_block
// keeps them. The products cover every head once any is seen: a head that the mask hides in this
// block gets -inf scores, which add nothing.
template <typename T>
void stacked_heads_step(const AttentionParams& p, const KeysValues<T>& kv, const AttentionSequence& seq,
                        uint64_t seed, uint64_t offset, int64_t b, int64_t h0, int64_t heads, int64_t i0, int64_t j0,
                        int64_t cols, ForwardScratch& w) {
  const int64_t v_pad = padded_to(p.v_dim, kCols), hk = h0 / (p.heads / p.kv_heads);
  const KeyRuns<T> runs = key_runs(p, kv, seq, b, hk, j0, cols, w.gathered);
  run_key_dots(runs, p.q + attention_q_at(p, seq, b, h0, i0), p.q_stride[1], heads, p.dim, p.scale, w.scores.data());
  if (p.qv != nullptr) {
    run_value_dots(runs, p.qv + attention_qv_at(p, seq, b, h0, i0), p.qv_stride[1], heads, p.v_dim, p.scale,
                   w.scores.data());
  }
  for (int64_t e = 0; e < heads; ++e) {
    block_probabilities(p, seq, seed, offset, b, h0 + e, e, i0, 1, j0, cols, w.scores.data() + e * kKeyBlock, w);
  }
  run_value_sums(runs, w.scores.data(), heads, p.v_dim, w.acc.data(), w.head_rows * v_pad);
}

// out = factor * in, n elements.
template <CpuCapability isa>
GF_CPU_INLINE void scaled_row_for(const float* __restrict in, float factor, int64_t n, float* __restrict out) {
  for (int64_t c = 0; c < n; ++c) out[c] = in[c] * factor;
}
GF_CPU_DISPATCH(scaled_row)

// One block of queries of heads h0 .. h0 + heads (which share key head hk) against every key block
// its band reaches: each key block, packed or read in place, serves all the heads while in cache.
template <typename T>
void forward_block(const AttentionParams& p, const KeysValues<T>& kv, const KeyPanels& panels, const OutputRows& out,
                   uint64_t seed, uint64_t offset, int64_t b, int64_t h0, int64_t heads, int64_t i0,
                   ForwardScratch& w) {
  const AttentionSequence seq = attention_sequence(p, b);
  const int64_t rows = std::min(kQueryBlock, seq.q_len - i0), hk = h0 / (p.heads / p.kv_heads);
  if (rows <= 0) return;  // past a packed sequence's end
  const int64_t v_pad = padded_to(p.v_dim, kCols);
  const bool shared = panels.packed() && shares_panels(seq, heads, p.heads / p.kv_heads / heads);
  for (int64_t e = 0; e < heads; ++e) {  // the rows in use only: a decoding step has one per head
    std::fill_n(w.acc.begin() + e * w.head_rows * v_pad, rows * v_pad, 0.0f);
    std::fill_n(w.max.begin() + e * w.head_rows, rows, -__builtin_inff());
    std::fill_n(w.sum.begin() + e * w.head_rows, rows, 0.0f);
  }
#if GF_HAS_BFLOAT16_PAIRS
  if (kv.pairs && (shared || packs_panels(rows, heads))) {
    const int64_t pairs = p.dim / 2;
    for (int64_t e = 0; e < heads; ++e) {  // bfloat16 values in float32: rounding keeps them
      round_rows_to_pairs(p.q + attention_q_at(p, seq, b, h0 + e, i0), p.q_stride[2], rows, p.dim,
                          w.q_pairs.data() + e * w.head_rows * pairs, pairs);
    }
  }
#endif
  const auto [first_key, end_key] = key_range(seq, i0, rows);
  for (int64_t j0 = first_key / kKeyBlock * kKeyBlock; j0 < end_key; j0 += kKeyBlock) {
    const int64_t cols = std::min(kKeyBlock, seq.k_len - j0);
    bool any_seen = false;
    for (int64_t e = 0; e < heads; ++e) {
      const bool same_mask = e > 0 && p.mask_stride[1] == 0;  // broadcast over heads
      w.seen[e] = same_mask ? w.seen[0] : !block_masked_out(p, b, h0 + e, i0, rows, j0, cols);
      any_seen = any_seen || w.seen[e];
    }
    if (!any_seen) continue;
    const float *k_panel = nullptr, *v_panel = nullptr;  // null: K and V read in place
    if (shared) {
      k_panel = panels.k_panel(p, b, hk, j0 / kKeyBlock);
      v_panel = panels.v_panel(p, b, hk, j0 / kKeyBlock);
    } else if (packs_panels(rows, heads)) {
      pack_key_block(p, kv, seq, b, hk, j0, cols, w.k_panel.data(), w.v_panel.data(), w.gathered);
      k_panel = w.k_panel.data();
      v_panel = w.v_panel.data();
    }
    if (k_panel == nullptr && stacks_heads(rows, heads)) {
      stacked_heads_step(p, kv, seq, seed, offset, b, h0, heads, i0, j0, cols, w);
      continue;
    }
    // In place: K and V for the products, or V for qv's part of the scores beside the panels'.
    const KeyRuns<T> runs = k_panel == nullptr || p.qv != nullptr ? key_runs(p, kv, seq, b, hk, j0, cols, w.gathered)
                                                                  : KeyRuns<T>{};
    for (int64_t e = 0; e < heads; ++e) {
      if (!w.seen[e]) continue;
      const int64_t h = h0 + e;
      const float* q = p.q + attention_q_at(p, seq, b, h, i0);
      float* acc = w.acc.data() + e * w.head_rows * v_pad;
      prefetch_mask_rows(p, mask_at(p, b, h, i0, j0), std::min(rows, kMaskRowsAhead), cols);
      if (k_panel != nullptr) {
        scores_from_panel(p, kv, q, e, rows, k_panel, block_width(cols), w);
      } else {
        run_key_dots(runs, q, p.q_stride[2], rows, p.dim, p.scale, w.scores.data());
      }
      if (p.qv != nullptr) {
        run_value_dots(runs, p.qv + attention_qv_at(p, seq, b, h, i0), p.qv_stride[2], rows, p.v_dim, p.scale,
                       w.scores.data());
      }
      const bool rounded = block_probabilities(p, seq, seed, offset, b, h, e, i0, rows, j0, cols, w.scores.data(), w,
                                               v_panel != nullptr && kv.pairs ? w.p_pairs.data() : nullptr);
      if (v_panel != nullptr) {
        values_from_panel(p, kv, rows, v_panel, block_width(cols), acc, w, rounded);
      } else {
        run_value_sums(runs, w.scores.data(), rows, p.v_dim, acc, v_pad);
      }
    }
  }
  for (int64_t e = 0; e < heads; ++e) {
    const int64_t h = h0 + e;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = e * w.head_rows + r;
      const float sum = w.sum[row];
      const bool seen = !(w.max[row] == -__builtin_inff());  // NaN counts as seen
      const int64_t at = seq.out_row(h, i0 + r) * p.v_dim;
      float lse = seen ? w.max[row] + log_f32(sum) : -__builtin_inff();
      float factor = 1.0f / sum;
      if (p.sinks != nullptr) {
        lse = attention_lse_with_sink(lse, p.sinks[h]);
        factor = exp_nonpositive(w.max[row] - lse);  // acc's e^(s - max) over e^lse
      }
      if (!seen) {
        store_zeros(out.data, out.type, at, p.v_dim);  // not acc * 0: acc holds 0 * V, NaN where V has inf or NaN
      } else if (out.type == at::kFloat) {
        scaled_row(w.acc.data() + row * v_pad, factor, p.v_dim, static_cast<float*>(out.data) + at);
      } else {
        scaled_row(w.acc.data() + row * v_pad, factor, p.v_dim, w.o_row.data());
        store_floats(out.data, out.type, at, w.o_row.data(), p.v_dim);
      }
      p.lse[seq.lse_row(h, i0 + r)] = lse;
    }
  }
}

// How many query heads of one key head a task takes together (a divisor of group): all of them,
// unless that leaves fewer than four tasks per thread, given blocks (batch, key head, query block)
// triples.
int64_t heads_per_task(int64_t group, int64_t blocks) {
  const int64_t wanted = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t heads = group;
  while (heads > 1 && blocks * (group / heads) < wanted) {
    do --heads;
    while (group % heads != 0);
  }
  return heads;
}

template <typename T>
void attention_forward_impl(const AttentionParams& p, const KeysValues<T>& kv, const OutputRows& out) {
  uint64_t seed = 0, offset = 0;
  resolve_philox_key(p.key, &seed, &offset);
  const int64_t q_blocks = (p.q_len + kQueryBlock - 1) / kQueryBlock, group = p.heads / p.kv_heads;
  const int64_t pairs = p.batch * p.kv_heads, heads = heads_per_task(group, pairs * q_blocks);
  const int64_t head_runs = group / heads;  // tasks per (batch, key head, query block)
  // Packed panels when each key block is read by several tasks (of a packed batch: of one of its
  // sequences, shares_panels).
  const bool packs = packs_panels(p.q_len, heads);
  const bool shared = packs && q_blocks * head_runs > 1;
  const bool varlen = p.cu_seqlens_q != nullptr;  // sequences that do not share may pack their own
  int64_t pass = pairs;  // (batch, key head) pairs a pass covers
  KeyPanels panels;
  if (shared) {
    panels = key_panel_sizes(p, kv.pairs);
    const int64_t pair_floats = panels.k_blocks * (panels.k_size + panels.v_size);
    pass = std::clamp<int64_t>(kPanelBudget / std::max<int64_t>(1, pair_floats), 1, pairs);
    panels.k = uninitialized_floats(static_cast<size_t>(pass * panels.k_blocks * panels.k_size));
    panels.v = uninitialized_floats(static_cast<size_t>(pass * panels.k_blocks * panels.v_size));
  }
  for (int64_t first_pair = 0; first_pair < pairs; first_pair += pass) {
    const int64_t count = std::min(pass, pairs - first_pair);
    if (shared) pack_key_panels(p, kv, first_pair, count, heads, panels);
    at::parallel_for(0, count * head_runs * q_blocks, 1, [&](int64_t first, int64_t last) {
      ForwardScratch scratch(std::min(kQueryBlock, p.q_len), block_width(std::min(kKeyBlock, p.k_len)), p.dim,
                             padded_to(p.v_dim, kCols), heads, packs && (!shared || varlen), p.dropout_p > 0.0f,
                             kv.pairs);
      for (int64_t task = first; task < last; ++task) {
        const int64_t block = task % q_blocks, run = first_pair * head_runs + task / q_blocks;
        const int64_t b = run / (p.heads / heads), h0 = run % (p.heads / heads) * heads;
        forward_block(p, kv, panels, out, seed, offset, b, h0, heads, block * kQueryBlock, scratch);
      }
    });
  }
}

// The backward's inputs beside the forward's: grad_o in o's layout and delta_i = grad_o_i . o_i -
// grad_lse_i in lse's, contiguous; outputs contiguous in q's, k's, v's shapes.
struct AttentionGrads {
  const float* grad_o;
  const float* delta;
  // Where the products take bfloat16 pairs: q, k, v and grad_o as bfloat16 bits (q, k and v at
  // AttentionParams' strides, grad_o contiguous in o's layout); AttentionParams' q, k and v and the
  // grad_o above are null then.
  const uint16_t *q_bits, *k_bits, *v_bits, *grad_o_bits;
  void* grad_q;  // rows AttentionSequence::out_row of dim, in grad_type (float32 or bfloat16)
  void* grad_k;  // rows AttentionSequence::key_out_row of dim
  void* grad_v;  // and of v_dim
  at::ScalarType grad_type;
  // Null, or dL/ds added up in `copies` buffers (one per part of the tasks), one after another, of
  // (mask_batches, mask_heads, mask_rows, Lk): each of the first three the whole dim or 1 (summed).
  float* grad_mask;
  int64_t copies, mask_batches, mask_heads, mask_rows;
  // Or, where the mask has every dim (each element of dS is its own gradient), null grad_mask and dS
  // stored once here in the mask's dtype, (B, H, Lq, Lk): no float32 buffer to zero, fill and round.
  void* mask_grad;
  at::ScalarType mask_grad_type;
  bool stream_mask_grad;  // a float32 mask_grad larger than the caches: written with streaming stores
};

// The row of a copy of grad_mask that the row of dS of (batch b, head h, query i) adds to.
int64_t mask_grad_row(const AttentionGrads& g, int64_t b, int64_t h, int64_t i) {
  return ((g.mask_batches > 1 ? b : 0) * g.mask_heads + (g.mask_heads > 1 ? h : 0)) * g.mask_rows +
         (g.mask_rows > 1 ? i : 0);
}

// dS of row (b, h, i) for keys j0 .. j0 + cols into AttentionGrads::mask_grad, in its dtype; zeros
// where ds is null (a row no task computes there: outside the band, or in a skipped block).
void store_mask_grad_row(const AttentionParams& p, const AttentionGrads& g, int64_t b, int64_t h, int64_t i,
                         int64_t j0, int64_t cols, const float* ds) {
  const int64_t at = ((b * p.heads + h) * p.q_len + i) * p.k_len + j0;
  if (ds != nullptr) return store_floats(g.mask_grad, g.mask_grad_type, at, ds, cols, g.stream_mask_grad);
  store_zeros(g.mask_grad, g.mask_grad_type, at, cols);
}

// body(first, last, copy) over the tasks [0, n): with one copy of grad_mask, as at::parallel_for
// shares them out; with more, in that many fixed parts, each adding to its own copy, so that the
// sums (and their bits) do not depend on which thread runs a part. Each thread fences its streaming
// stores (AttentionGrads::stream_mask_grad) before the caller reads what they wrote.
template <typename Body>
void for_task_parts(int64_t n, int64_t copies, const Body& body) {
  if (copies <= 1) {
    at::parallel_for(0, n, 1, [&](int64_t first, int64_t last) {
      body(first, last, int64_t{0});
      streaming_store_fence();
    });
    return;
  }
  at::parallel_for(0, copies, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) body(c * n / copies, (c + 1) * n / copies, c);
    streaming_store_fence();
  });
}

// With pairs, the products take bfloat16 pairs (bfloat16_pairs.h): the panels hold words in half
// their floats, and a_pairs the rows of A rounded to bfloat16 (P and dS too, as the GPU kernels round
// them). Sized to the blocks p's lengths allow (rows <= R queries, even; block widths <= C keys), so
// that a short sequence's backward does not allocate and zero 128 x 128 blocks per call.
struct BackwardScratch {
  AlignedFloats k_panel, vt_panel, scores, dp, drop, cap, panel_a, panel_b, acc_a, acc_b;  // drop with dropout
  bool pairs;
  std::vector<uint32_t> a_pairs, a_rows;  // a_rows: a_pairs' panel turned into rows, for AMX tiles
  BackwardScratch(const AttentionParams& p, bool pairs)
      : BackwardScratch(padded_to(std::min(kQueryBlock, p.q_len), 2), block_width(std::min(kKeyBlock, p.k_len)),
                        padded_to(p.dim, kCols), padded_to(p.v_dim, kCols), p.dropout_p > 0.0f, pairs) {}
  BackwardScratch(int64_t R, int64_t C, int64_t d_pad, int64_t v_pad, bool dropout, bool pairs)
      : k_panel(static_cast<size_t>(d_pad * C)), vt_panel(static_cast<size_t>(v_pad * C)),
        scores(static_cast<size_t>(R * kKeyBlock)), dp(static_cast<size_t>(R * kKeyBlock)),
        drop(dropout ? static_cast<size_t>(R * kKeyBlock) : 0), cap(static_cast<size_t>(R * kKeyBlock)),
        panel_a(static_cast<size_t>(R * std::max(d_pad, v_pad))),
        panel_b(static_cast<size_t>(C * std::max(d_pad, v_pad))),
        acc_a(static_cast<size_t>(C * d_pad)), acc_b(static_cast<size_t>(C * v_pad)), pairs(pairs),
        a_pairs(pairs ? static_cast<size_t>(R * std::max({C, d_pad, v_pad}) / 2) : 0),
        a_rows(pairs && takes_tiles() ? static_cast<size_t>(R * C / 2) : 0) {}
};

#if GF_HAS_BFLOAT16_PAIRS
uint32_t* words(AlignedFloats& panel) { return reinterpret_cast<uint32_t*>(panel.data()); }
#endif

// w.scores = scale Q K^T and w.dp = dO V^T (rows x width) for queries i0 .. i0 + rows of head h
// (w.k_panel = K^T, w.vt_panel = V^T).
void score_products(const AttentionParams& p, const AttentionSequence& seq, const AttentionGrads& g, int64_t b,
                    int64_t h, int64_t i0, int64_t rows, int64_t width, BackwardScratch& w) {
  const int64_t q_at = attention_q_at(p, seq, b, h, i0), grad_o_at = seq.out_row(h, i0) * p.v_dim;
  const int64_t grad_o_row = seq.out_position * p.v_dim;
#if GF_HAS_BFLOAT16_PAIRS
  if (w.pairs) {
    round_rows_to_pairs(g.q_bits + q_at, p.q_stride[2], rows, p.dim, w.a_pairs.data(), p.dim / 2);
    multiply_pairs(pair_rows(w.a_pairs.data(), p.dim / 2), rows, words(w.k_panel), p.dim / 2, w.scores.data(),
                   kKeyBlock, width, false, p.scale);
    round_rows_to_pairs(g.grad_o_bits + grad_o_at, grad_o_row, rows, p.v_dim, w.a_pairs.data(), p.v_dim / 2);
    multiply_pairs(pair_rows(w.a_pairs.data(), p.v_dim / 2), rows, words(w.vt_panel), p.v_dim / 2, w.dp.data(),
                   kKeyBlock, width, false, 1.0f);
    return;
  }
#endif
  multiply(p.q + q_at, p.q_stride[2], 1, rows, w.k_panel.data(), p.dim, w.scores.data(), kKeyBlock, width, false,
           p.scale);
  multiply(g.grad_o + grad_o_at, grad_o_row, 1, rows, w.vt_panel.data(), p.v_dim, w.dp.data(), kKeyBlock, width,
           false, 1.0f);
}

// w.panel_b = key block j0's K (cols rows, zeros to block_width(cols)), for add_grad_q.
void pack_keys_for_grad_q(const AttentionParams& p, const AttentionGrads& g, const AttentionSequence& seq, int64_t b,
                          int64_t hk, int64_t j0, int64_t cols, BackwardScratch& w) {
  const int64_t k_at = attention_k_at(p, seq, b, hk, j0), d_pad = padded_to(p.dim, kCols);
#if GF_HAS_BFLOAT16_PAIRS
  if (w.pairs) {
    pack_pairs_interleaved(g.k_bits + k_at, p.k_stride[2], cols, p.dim, words(w.panel_b), d_pad, block_width(cols));
    return;
  }
#endif
  pack_rows(p.k + k_at, p.k_stride[2], cols, p.dim, w.panel_b.data(), d_pad, block_width(cols));
}

// grad_q (rows x d_pad) += scale dS K, dS in w.dp (rows x width), K in w.panel_b (width deep).
void add_grad_q(const AttentionParams& p, int64_t rows, int64_t width, float* grad_q, BackwardScratch& w) {
  const int64_t d_pad = padded_to(p.dim, kCols);
#if GF_HAS_BFLOAT16_PAIRS
  if (w.pairs) {
    const int64_t pairs = width / 2;
    round_rows_to_pairs(w.dp.data(), kKeyBlock, rows, width, w.a_pairs.data(), pairs);
    multiply_pairs(pair_rows(w.a_pairs.data(), pairs), rows, words(w.panel_b), pairs, grad_q, d_pad, d_pad, true,
                   p.scale);
    return;
  }
#endif
  multiply(w.dp.data(), kKeyBlock, 1, rows, w.panel_b.data(), width, grad_q, d_pad, d_pad, true, p.scale);
}

// out (cols x width) += factor * X^T Y, X the rows x kKeyBlock block x (P or dS), Y the rows from
// element y_at of y (floats) or, on pairs, y_bits (y_row apart, dim wide; width = dim padded): dV +=
// P^T dO and dK += scale dS^T Q. Y is packed in w.panel_a.
void add_transposed_product(const float* x, const float* y, const uint16_t* y_bits, int64_t y_at, int64_t y_row,
                            int64_t rows, int64_t cols, int64_t dim, float* out, float factor, BackwardScratch& w) {
  const int64_t width = padded_to(dim, kCols);
#if GF_HAS_BFLOAT16_PAIRS
  if (w.pairs) {  // X^T's rows are X's columns: X packed as a panel, read a column at a time
    const int64_t depth = padded_to(rows, 2), pairs = depth / 2;
    pack_pairs_interleaved(y_bits + y_at, y_row, rows, dim, words(w.panel_a), width, depth);
    pack_pairs_interleaved(x, kKeyBlock, rows, cols, w.a_pairs.data(), block_width(cols), depth);
    if (product_takes_tiles(cols, pairs)) {  // tiles read whole rows: the columns turned into rows
      panel_columns_as_rows(w.a_pairs.data(), pairs, block_width(cols), w.a_rows.data());
      multiply_pairs(pair_rows(w.a_rows.data(), pairs), cols, words(w.panel_a), pairs, out, width, width, true,
                     factor);
      return;
    }
    multiply_pairs(PairRows{w.a_pairs.data(), 1, kCols, kCols * pairs}, cols, words(w.panel_a), pairs, out, width,
                   width, true, factor);
    return;
  }
#endif
  pack_rows(y + y_at, y_row, rows, dim, w.panel_a.data(), width, rows);
  multiply(x, 1, kKeyBlock, cols, w.panel_a.data(), rows, out, width, width, true, factor);
}

#if GF_HAS_EXP_LANES
// probabilities_and_score_grads' AVX-512 loop for a row seen by some key; width a multiple of kCols.
GF_CPU_TARGET_AVX512 void probabilities_and_score_grads_lanes(float* __restrict s, float* __restrict dp, int64_t width,
                                                               float lse, float delta) {
  const __m512 shift = _mm512_set1_ps(lse), mean = _mm512_set1_ps(delta);
  for (int64_t c = 0; c < width; c += kCols) {
    const __m512 prob = exp_nonpositive_lanes(_mm512_sub_ps(_mm512_loadu_ps(s + c), shift));
    _mm512_storeu_ps(s + c, prob);
    _mm512_storeu_ps(dp + c, _mm512_mul_ps(prob, _mm512_sub_ps(_mm512_loadu_ps(dp + c), mean)));
  }
}
#endif

// One row (width wide): s = P = exp(s - lse) (0 where lse = -inf: the row saw no key) and dp = dS =
// P (dp - delta).
template <CpuCapability isa>
GF_CPU_INLINE void probabilities_and_score_grads_for(float* __restrict s, float* __restrict dp, int64_t width,
                                                     float lse, float delta) {
  if (lse == -__builtin_inff()) {
    for (int64_t c = 0; c < width; ++c) {
      s[c] = 0.0f;
      dp[c] = 0.0f * (dp[c] - delta);
    }
    return;
  }
#if GF_HAS_EXP_LANES
  if constexpr (isa == CpuCapability::kAvx512) return probabilities_and_score_grads_lanes(s, dp, width, lse, delta);
#endif
  for (int64_t c = 0; c < width; ++c) {
    const float prob = exp_nonpositive(s[c] - lse);
    s[c] = prob;
    dp[c] = prob * (dp[c] - delta);
  }
}
GF_CPU_DISPATCH(probabilities_and_score_grads)

// A row of score gradients dp (width wide) times the soft-cap's slope: the gradient of the capped
// scale q.k.
template <CpuCapability isa>
GF_CPU_INLINE void chain_soft_cap_for(const float* __restrict slope, int64_t width, float* __restrict dp) {
  for (int64_t c = 0; c < width; ++c) dp[c] *= slope[c];
}
GF_CPU_DISPATCH(chain_soft_cap)

// For queries i0.. (rows) against keys j0.. (cols): scores = the probabilities P (dropout not
// applied) and dp = dS, the gradient of the scores s (before soft-capping's chain rule is applied
// when for_scaled_dot: then the gradient of scale q.k). Needs w.k_panel = K^T and w.vt_panel = V^T.
// With with_mask_grad, dS goes to the copy of AttentionGrads::grad_mask that grad_mask points to, or
// where that is null to AttentionGrads::mask_grad.
void probabilities_and_grads(const AttentionParams& p, const AttentionSequence& seq, const AttentionGrads& g,
                             uint64_t seed, uint64_t offset, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                             int64_t cols, bool with_mask_grad, float* grad_mask, BackwardScratch& w) {
  const int64_t row0 = seq.lse_row(h, i0), width = block_width(cols);
  prefetch_mask_rows(p, mask_at(p, b, h, i0, j0), std::min(rows, kMaskRowsAhead), cols);
  score_products(p, seq, g, b, h, i0, rows, width, w);
  finish_scores(p, seq, b, h, i0, rows, j0, cols, w.scores.data(), w.cap.data());
  if (p.dropout_p > 0.0f) {  // dP of the probabilities before dropout
    dropout_scales(p, seq, seed, offset, h, i0, rows, j0, cols, w.drop.data());
    apply_dropout_scales(w.drop.data(), rows, width, w.dp.data());
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* s = w.scores.data() + r * kKeyBlock;
    float* dp = w.dp.data() + r * kKeyBlock;
    probabilities_and_score_grads(s, dp, width, p.lse[row0 + r], g.delta[row0 + r]);
    if (with_mask_grad && grad_mask != nullptr) {
      float* out = grad_mask + mask_grad_row(g, b, h, i0 + r) * p.k_len + j0;
      for (int64_t c = 0; c < cols; ++c) out[c] += dp[c];
    } else if (with_mask_grad) {
      store_mask_grad_row(p, g, b, h, i0 + r, j0, cols, dp);
    }
    if (p.softcap > 0.0f) chain_soft_cap(w.cap.data() + r * kKeyBlock, width, dp);
  }
}

void load_key_panels(const AttentionParams& p, const AttentionGrads& g, const AttentionSequence& seq, int64_t b,
                     int64_t hk, int64_t j0, int64_t cols, BackwardScratch& w) {
  const int64_t k_at = attention_k_at(p, seq, b, hk, j0), v_at = attention_v_at(p, seq, b, hk, j0);
  const int64_t width = block_width(cols);
#if GF_HAS_BFLOAT16_PAIRS
  if (w.pairs) {
    pack_pairs_transposed(g.k_bits + k_at, p.k_stride[2], cols, p.dim / 2, words(w.k_panel), width);
    pack_pairs_transposed(g.v_bits + v_at, p.v_stride[2], cols, p.v_dim / 2, words(w.vt_panel), width);
    return;
  }
#endif
  pack_transposed(p.k + k_at, p.k_stride[2], cols, p.dim, w.k_panel.data(), width);
  pack_transposed(p.v + v_at, p.v_stride[2], cols, p.v_dim, w.vt_panel.data(), width);
}

// sum[c] += x[c] for c < n, a multiple of kCols.
template <CpuCapability isa>
GF_CPU_INLINE void add_to_sum_for(const float* __restrict x, int64_t n, float* __restrict sum) {
  for (int64_t c = 0; c < n; c += kCols) {
    store16(sum + c, load16<kVectorLanes<isa>>(sum + c) + load16<kVectorLanes<isa>>(x + c));
  }
}
GF_CPU_DISPATCH(add_to_sum)

// grad_q's rows i0 .. i0 + rows of head h from accumulators rows x d_pad.
void copy_grad_q(const AttentionParams& p, const AttentionSequence& seq, const AttentionGrads& g, int64_t h, int64_t i0,
                 int64_t rows, const float* acc) {
  const int64_t d_pad = padded_to(p.dim, kCols);
  for (int64_t r = 0; r < rows; ++r) {
    store_floats(g.grad_q, g.grad_type, seq.out_row(h, i0 + r) * p.dim, acc + r * d_pad, p.dim);
  }
}

// dK and dV of one block of keys: over every query head sharing its key head and every query the
// band lets see it; dS added to grad_mask's copy `copy`. With grad_q (the group's heads' rows, q_len x
// d_pad each), also adds to dQ.
void key_block_grads(const AttentionParams& p, const AttentionGrads& g, uint64_t seed, uint64_t offset, int64_t b,
                     int64_t hk, int64_t j0, int64_t copy, BackwardScratch& w, float* grad_q = nullptr) {
  const AttentionSequence seq = attention_sequence(p, b);
  const int64_t cols = std::min(kKeyBlock, seq.k_len - j0), group = p.heads / p.kv_heads;
  if (cols <= 0) return;  // past a packed sequence's end
  const int64_t width = block_width(cols);
  const int64_t d_pad = padded_to(p.dim, kCols), v_pad = padded_to(p.v_dim, kCols);
  std::fill(w.acc_a.begin(), w.acc_a.end(), 0.0f);
  std::fill(w.acc_b.begin(), w.acc_b.end(), 0.0f);
  load_key_panels(p, g, seq, b, hk, j0, cols, w);
  if (grad_q != nullptr) pack_keys_for_grad_q(p, g, seq, b, hk, j0, cols, w);
  const bool with_mask_grad = g.grad_mask != nullptr || g.mask_grad != nullptr;
  float* grad_mask =
      g.grad_mask == nullptr ? nullptr : g.grad_mask + copy * g.mask_batches * g.mask_heads * g.mask_rows * p.k_len;
  const auto [first_query, end_query] = query_range(seq, j0, cols);
  // Zeros in mask_grad's rows of these keys that no block below computes.
  const auto zero_mask_grad = [&](int64_t h, int64_t first, int64_t end) {
    if (g.mask_grad == nullptr) return;
    for (int64_t i = first; i < end; ++i) store_mask_grad_row(p, g, b, h, i, j0, cols, nullptr);
  };
  const int64_t band_first = std::min(first_query, seq.q_len), band_end = std::max(end_query, band_first);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    zero_mask_grad(h, 0, band_first);
    zero_mask_grad(h, band_end, seq.q_len);
    for (int64_t i0 = first_query; i0 < end_query; i0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, end_query - i0);
      if (block_masked_out(p, b, h, i0, rows, j0, cols)) {
        zero_mask_grad(h, i0, i0 + rows);
        continue;
      }
      probabilities_and_grads(p, seq, g, seed, offset, b, h, i0, rows, j0, cols, with_mask_grad, grad_mask, w);
      if (grad_q != nullptr) add_grad_q(p, rows, width, grad_q + ((h - hk * group) * p.q_len + i0) * d_pad, w);
      if (p.dropout_p > 0.0f) apply_dropout_scales(w.drop.data(), rows, width, w.scores.data());
      add_transposed_product(w.scores.data(), g.grad_o, g.grad_o_bits, seq.out_row(h, i0) * p.v_dim,
                             seq.out_position * p.v_dim, rows, cols, p.v_dim, w.acc_b.data(), 1.0f, w);
      add_transposed_product(w.dp.data(), p.q, g.q_bits, attention_q_at(p, seq, b, h, i0), p.q_stride[2], rows, cols,
                             p.dim, w.acc_a.data(), p.scale, w);
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t key = seq.key_out_row(hk, j0 + c);
    store_floats(g.grad_k, g.grad_type, key * p.dim, w.acc_a.data() + c * d_pad, p.dim);
    store_floats(g.grad_v, g.grad_type, key * p.v_dim, w.acc_b.data() + c * v_pad, p.v_dim);
  }
}

// dQ of one block of queries: over every key block its band reaches (dS went to grad_mask already).
void query_block_grads(const AttentionParams& p, const AttentionGrads& g, uint64_t seed, uint64_t offset, int64_t b,
                       int64_t h, int64_t i0, BackwardScratch& w) {
  const AttentionSequence seq = attention_sequence(p, b);
  const int64_t rows = std::min(kQueryBlock, seq.q_len - i0), hk = h / (p.heads / p.kv_heads);
  if (rows <= 0) return;  // past a packed sequence's end
  AlignedFloats& grad_q = w.panel_a;  // rows x d_pad accumulators
  std::fill(grad_q.begin(), grad_q.end(), 0.0f);
  const auto [first_key, end_key] = key_range(seq, i0, rows);
  for (int64_t j0 = first_key / kKeyBlock * kKeyBlock; j0 < end_key; j0 += kKeyBlock) {
    const int64_t cols = std::min(kKeyBlock, seq.k_len - j0);
    if (block_masked_out(p, b, h, i0, rows, j0, cols)) continue;
    load_key_panels(p, g, seq, b, hk, j0, cols, w);
    probabilities_and_grads(p, seq, g, seed, offset, b, h, i0, rows, j0, cols, false, nullptr, w);
    pack_keys_for_grad_q(p, g, seq, b, hk, j0, cols, w);
    add_grad_q(p, rows, block_width(cols), grad_q.data(), w);
  }
  copy_grad_q(p, seq, g, h, i0, rows, grad_q.data());
}

// The memory the backward's chunks of key blocks may take for their dQ accumulators: 256 MiB, or
// GENFAST_CPU_ATTENTION_DQ_BUDGET_MIB, or dQ's own size (float32) where that is more.
int64_t chunked_grad_q_budget(const AttentionParams& p) {
  const char* mib = std::getenv("GENFAST_CPU_ATTENTION_DQ_BUDGET_MIB");
  const int64_t floats = (mib != nullptr ? std::clamp<int64_t>(std::atoll(mib), 0, int64_t{1} << 30) : 256) << 18;
  return std::max(floats, attention_lse_rows(p) * padded_to(p.dim, kCols));
}

// How many chunks each (batch, key head) pair's key blocks are dealt out in, each chunk a task with its
// own dQ accumulators (the pair's group of heads, q_len x d_pad each; with one chunk, a buffer per
// thread, copied out after each pair), summed afterwards; or 0 for the other schedule, a pass per
// key block and one per query block, which recomputes the scores. Whichever takes the least time by
// a count of products (over a pair's queries and keys) times the rounds of tasks the threads take
// (contiguous runs, as at::parallel_for shares them out): a chunk of c takes 5 / c, where the other
// takes 4 / (key blocks) a task and then 3 / (heads x query blocks of the group) a task. Chunks up
// to one a key block, four tasks a thread and as many as chunked_grad_q_budget allows; the fewest
// of the fastest.
int64_t key_block_chunks(const AttentionParams& p, int64_t k_blocks, int64_t q_blocks, int64_t threads) {
  if (threads == 1) return 1;
  const int64_t pairs = p.batch * p.kv_heads, group = p.heads / p.kv_heads;
  const auto makespan = [threads](int64_t tasks, double products) {
    return static_cast<double>((tasks + threads - 1) / threads) * products;
  };
  const int64_t pair_floats = group * p.q_len * padded_to(p.dim, kCols);
  const int64_t allowed = chunked_grad_q_budget(p) / std::max<int64_t>(1, pairs * pair_floats);
  const int64_t most = std::max<int64_t>(1, std::min({k_blocks, allowed, (4 * threads + pairs - 1) / pairs}));
  int64_t chunks = 1;
  for (int64_t c = 2; c <= most; ++c) {
    if (makespan(pairs * c, 5.0 / c) < makespan(pairs * chunks, 5.0 / chunks)) chunks = c;
  }
  const double recomputed = makespan(pairs * k_blocks, 4.0 / std::max<int64_t>(1, k_blocks)) +
                            makespan(p.batch * p.heads * q_blocks, 3.0 / std::max<int64_t>(1, group * q_blocks));
  return makespan(pairs * chunks, 5.0 / chunks) <= recomputed ? chunks : 0;
}

void attention_backward_impl(const AttentionParams& p, const AttentionGrads& g, bool pairs) {
  uint64_t seed = 0, offset = 0;
  resolve_philox_key(p.key, &seed, &offset);
  const int64_t d_pad = padded_to(p.dim, kCols);
  const int64_t k_blocks = (p.k_len + kKeyBlock - 1) / kKeyBlock, q_blocks = (p.q_len + kQueryBlock - 1) / kQueryBlock;
  const int64_t group = p.heads / p.kv_heads, kv_pairs = p.batch * p.kv_heads;
  const int64_t pair_floats = group * p.q_len * d_pad;
  const int64_t chunks = key_block_chunks(p, k_blocks, q_blocks, at::get_num_threads());
  // dK and dV of pair `pair`'s key blocks chunk, chunk + chunks, ..., and their part of dQ added to
  // grad_q (pair_floats, each head's q_len rows; zeroed here as far as the sequence has rows, which
  // are all that are read). Dealt out a block at a time, so that a causal band's blocks (more
  // queries each towards one end) spread over the chunks.
  const auto chunk_grads = [&](int64_t pair, int64_t chunk, int64_t copy, BackwardScratch& scratch, float* grad_q) {
    const int64_t rows = attention_sequence(p, pair / p.kv_heads).q_len * d_pad;
    for (int64_t e = 0; e < group; ++e) std::fill_n(grad_q + e * p.q_len * d_pad, rows, 0.0f);
    for (int64_t block = chunk; block < k_blocks; block += chunks) {
      key_block_grads(p, g, seed, offset, pair / p.kv_heads, pair % p.kv_heads, block * kKeyBlock, copy, scratch,
                      grad_q);
    }
  };
  if (chunks == 1) {
    // One pass a (batch, key head) pair, dQ summed in the thread's buffer and copied out.
    for_task_parts(kv_pairs, g.copies, [&](int64_t first, int64_t last, int64_t copy) {
      BackwardScratch scratch(p, pairs);
      AlignedFloats grad_q(static_cast<size_t>(pair_floats));
      for (int64_t pair = first; pair < last; ++pair) {
        chunk_grads(pair, 0, copy, scratch, grad_q.data());
        const int64_t b = pair / p.kv_heads, hk = pair % p.kv_heads;
        const AttentionSequence seq = attention_sequence(p, b);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          copy_grad_q(p, seq, g, h, 0, seq.q_len, grad_q.data() + (h - hk * group) * p.q_len * d_pad);
        }
      }
    });
    return;
  }
  if (chunks > 1) {
    // Chunks of each pair's key blocks, each with its own dQ accumulators, summed in chunk order (no
    // atomics: the bits repeat for a given number of threads, which sets the chunks).
    const UninitializedFloats partial = uninitialized_floats(static_cast<size_t>(kv_pairs * chunks * pair_floats));
    for_task_parts(kv_pairs * chunks, g.copies, [&](int64_t first, int64_t last, int64_t copy) {
      BackwardScratch scratch(p, pairs);
      for (int64_t task = first; task < last; ++task) {
        chunk_grads(task / chunks, task % chunks, copy, scratch, partial.get() + task * pair_floats);
      }
    });
    at::parallel_for(0, p.batch * p.heads * q_blocks, 1, [&](int64_t first, int64_t last) {
      AlignedFloats sum(static_cast<size_t>(kQueryBlock * d_pad));
      for (int64_t task = first; task < last; ++task) {
        const int64_t i0 = task % q_blocks * kQueryBlock, bh = task / q_blocks, b = bh / p.heads, h = bh % p.heads;
        const AttentionSequence seq = attention_sequence(p, b);
        const int64_t rows = std::min(kQueryBlock, seq.q_len - i0);
        if (rows <= 0) continue;  // past a packed sequence's end
        const int64_t pair = b * p.kv_heads + h / group;
        const float* first_chunk = partial.get() + (pair * chunks * group + h % group) * p.q_len * d_pad + i0 * d_pad;
        std::copy(first_chunk, first_chunk + rows * d_pad, sum.begin());
        for (int64_t chunk = 1; chunk < chunks; ++chunk) {
          add_to_sum(first_chunk + chunk * pair_floats, rows * d_pad, sum.data());
        }
        copy_grad_q(p, seq, g, h, i0, rows, sum.data());
      }
    });
    return;
  }
  // Otherwise dK and dV per block of keys, then dQ per block of queries, recomputing the scores.
  for_task_parts(kv_pairs * k_blocks, g.copies, [&](int64_t first, int64_t last, int64_t copy) {
    BackwardScratch scratch(p, pairs);
    for (int64_t task = first; task < last; ++task) {
      const int64_t block = task % k_blocks, bh = task / k_blocks;
      key_block_grads(p, g, seed, offset, bh / p.kv_heads, bh % p.kv_heads, block * kKeyBlock, copy, scratch);
    }
  });
  at::parallel_for(0, p.batch * p.heads * q_blocks, 1, [&](int64_t first, int64_t last) {
    BackwardScratch scratch(p, pairs);
    for (int64_t task = first; task < last; ++task) {
      const int64_t block = task % q_blocks, bh = task / q_blocks;
      query_block_grads(p, g, seed, offset, bh / p.heads, bh % p.heads, block * kQueryBlock, scratch);
    }
  });
}

// o and lse of prepared inputs (k and v in their own dtype): (B, H, Lq, Dv) and (B, H, Lq), or varlen
// (total_q, H, Dv) and (H, total_q).
std::tuple<at::Tensor, at::Tensor> forward(AttentionTensors t, at::ScalarType dtype, double scale, double softcap,
                                           int64_t band_lo, int64_t band_hi, double dropout_p, int64_t seed,
                                           int64_t offset) {
  check_attention_options(scale, softcap, dropout_p, t.block_table.defined());
  t.q = t.q.to(at::kFloat);  // read a block at a time by every key block: widened once
  if (t.qv.defined()) t.qv = t.qv.to(at::kFloat);
  const bool varlen = t.cu_seqlens_q.defined();
  std::vector<int64_t> o_shape(t.q.sizes().begin(), t.q.sizes().end());
  o_shape.back() = t.v.size(-1);
  const auto floats = t.q.options().dtype(at::kFloat);
  // bfloat16 written as the kernel computes it; float16 rounded afterwards, by torch.
  const at::ScalarType o_type = dtype == at::kBFloat16 ? dtype : at::kFloat;
  at::Tensor o = at::empty(o_shape, floats.dtype(o_type));
  at::Tensor lse = varlen ? at::empty({t.q.size(1), t.q.size(0)}, floats)
                          : at::empty({t.q.size(0), t.q.size(1), t.q.size(2)}, floats);
  if (lse.numel() > 0) {
    const AttentionParams p = attention_params(t, scale, softcap, band_lo, band_hi, dropout_p, seed, offset, o, lse);
    const OutputRows rows{o.mutable_data_ptr(), o_type};
    switch (t.k.scalar_type()) {
      case at::kHalf:
        attention_forward_impl(
            p, KeysValues<c10::Half>{t.k.const_data_ptr<c10::Half>(), t.v.const_data_ptr<c10::Half>()}, rows);
        break;
      case at::kBFloat16:
        attention_forward_impl(
            p, KeysValues<c10::BFloat16>{t.k.const_data_ptr<c10::BFloat16>(), t.v.const_data_ptr<c10::BFloat16>(),
                                         takes_pairs(p)},
            rows);
        break;
      default:
        attention_forward_impl(p, KeysValues<float>{p.k, p.v}, rows);
    }
  }
  return {o.to(dtype), lse};
}

// grad_o . o of one row, each float32, float16 or bfloat16, n elements, in kCols interleaved lanes.
template <CpuCapability isa, typename G, typename T>
GF_CPU_INLINE float row_dot_for(const G* __restrict grad_o, const T* __restrict o, int64_t n) {
  Floats<isa> sum{};
  for (int64_t c = 0; c < n; c += kCols) {
    const int64_t m = std::min<int64_t>(kCols, n - c);
    sum += load_partial<isa>(grad_o + c, m) * load_partial<isa>(o + c, m);
  }
  return reduce_lanes(sum, AddLanes());
}
GF_CPU_DISPATCH(row_dot)

// delta_i = grad_o_i . o_i - grad_lse_i of every row, in lse's layout ((B, H, Lq), or packed (H,
// total_q)), from grad_o (float32 or bfloat16, contiguous in o's layout) and o read in its own dtype:
// no float32 copies, nor a tensor of the products.
at::Tensor row_deltas(const at::Tensor& grad_o, const at::Tensor& o, const std::optional<at::Tensor>& grad_lse,
                      const at::Tensor& lse, bool varlen) {
  const at::ScalarType type = o.scalar_type();
  const at::Tensor o_rows =
      type == at::kFloat || type == at::kHalf || type == at::kBFloat16 ? o.contiguous() : o.to(at::kFloat).contiguous();
  const at::Tensor lse_grad = grad_lse ? grad_lse->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  const int64_t rows = lse.numel(), dim = o.size(-1);
  const int64_t heads = varlen ? lse.size(0) : 1, total = varlen ? lse.size(1) : rows;
  const float* minus = lse_grad.defined() ? lse_grad.const_data_ptr<float>() : nullptr;
  float* out = delta.mutable_data_ptr<float>();
  const auto dots = [&](const auto* go, const auto* o_data) {
    at::parallel_for(0, rows, 256, [&](int64_t first, int64_t last) {
      for (int64_t e = first; e < last; ++e) {
        const int64_t row = varlen ? e % total * heads + e / total : e;  // o's row of lse's element e
        const float dot = row_dot(go + row * dim, o_data + row * dim, dim);
        out[e] = minus != nullptr ? dot - minus[e] : dot;
      }
    });
  };
  const auto with_o = [&](const auto* go) {
    switch (o_rows.scalar_type()) {
      case at::kHalf:
        return dots(go, o_rows.const_data_ptr<c10::Half>());
      case at::kBFloat16:
        return dots(go, o_rows.const_data_ptr<c10::BFloat16>());
      default:
        return dots(go, o_rows.const_data_ptr<float>());
    }
  };
  if (grad_o.scalar_type() == at::kBFloat16) {
    with_o(grad_o.const_data_ptr<c10::BFloat16>());
  } else {
    with_o(grad_o.to(at::kFloat).const_data_ptr<float>());
  }
  return delta;
}

// grad_q, grad_k, grad_v (in the inputs' dtype), with grad_mask the mask's gradient
// (attention_mask_grad), with sinks theirs.
AttentionBackwardResult backward(
    const char* op, const AttentionTensors& t, at::ScalarType dtype, const at::Tensor& grad_o,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& o, const at::Tensor& lse, double scale,
    double softcap, int64_t band_lo, int64_t band_hi, double dropout_p, int64_t seed, int64_t offset, bool grad_mask) {
  check_attention_options(scale, softcap, dropout_p);
  // For the mask's gradient, delta comes from the forward's float32 o (genfast.attention has the
  // forward keep it, float_o; handed a half-precision o, the backward recomputes it, one more forward):
  // delta from the stored half-precision o errs by its rounding, and dS = P (dP - delta) passes that on
  // whole where one key takes a row's weight, with no cancellation against dP's error as in an eager
  // softmax; a mask broadcast over heads then sums it (genfast check --fuzz, seeds 35242 and 61001).
  const bool float_o = grad_mask && dtype != at::kFloat && o.scalar_type() != at::kFloat;
  const at::Tensor o_for_delta =
      float_o ? std::get<0>(forward(t, at::kFloat, scale, softcap, band_lo, band_hi, dropout_p, seed, offset)) : o;
  const bool pairs = t.q.scalar_type() == at::kBFloat16;  // t as backward_takes_pairs has it prepared
  const AttentionGradInputs in = prepare_attention_grads(op, t, grad_o, grad_lse, o_for_delta, lse,
                                                         /*as_float=*/!pairs);
  const at::Tensor delta = row_deltas(in.grad_o, o_for_delta, grad_lse, in.lse, t.cu_seqlens_q.defined());
  const auto floats = t.q.options().dtype(at::kFloat);
  // The kernel writes every element of the gradients, in bfloat16 or float32 as it computes them
  // (float16's are rounded afterwards, by torch's vectorized conversion).
  const at::ScalarType grad_type = dtype == at::kBFloat16 ? dtype : at::kFloat;
  const bool runs = t.q.numel() > 0 && t.k.numel() > 0;
  // Keys past seqused_k are in no sequence: their rows of grad_k and grad_v stay zero.
  const bool writes_all_keys = !t.seqused_k.defined();
  const auto new_grad = [&](const at::Tensor& like, bool written) {
    return runs && written ? at::empty(like.sizes(), floats.dtype(grad_type))
                           : at::zeros(like.sizes(), floats.dtype(grad_type));
  };
  const at::Tensor grad_q = new_grad(t.q, true), grad_k = new_grad(t.k, writes_all_keys),
                   grad_v = new_grad(t.v, writes_all_keys);
  // dS summed over the dims the mask broadcasts on: in a copy per thread's part of the tasks where
  // those take less memory than one (B, H, Lq, Lk), else in that one, summed afterwards; for a mask
  // with every dim, stored as it is (in its dtype: nothing left to sum).
  const std::vector<int64_t> full{t.q.size(0), t.q.size(1), t.q.size(2), t.k.size(2)};
  const std::vector<int64_t> mask_shape = t.mask_grad_shape.empty() ? full : t.mask_grad_shape;
  const bool stored = grad_mask && runs && mask_shape == full && !t.mask_grad_sums_keys;
  const int64_t threads = at::get_num_threads();
  const bool per_part =
      grad_mask && threads * mask_shape[0] * mask_shape[1] * mask_shape[2] < full[0] * full[1] * full[2];
  const std::vector<int64_t> copy_shape = per_part ? mask_shape : full;
  const int64_t copies = per_part ? threads : 1;
  const at::Tensor grad_s =
      grad_mask && !stored ? at::zeros({copies, copy_shape[0], copy_shape[1], copy_shape[2], full[3]}, floats)
                           : at::Tensor();
  const at::Tensor stored_grad = stored ? at::empty(full, floats.dtype(t.mask_grad_dtype)) : at::Tensor();
  if (runs) {
    AttentionParams p = attention_params(t, scale, softcap, band_lo, band_hi, dropout_p, seed, offset, at::Tensor(),
                                         at::Tensor());
    p.lse = const_cast<float*>(in.lse.const_data_ptr<float>());  // read only by the backward
    // On pairs the products round grad_o to bfloat16 (a float32 one, the gradient of a float32 o
    // kept for a mask's gradient, once here); delta took it as it is.
    const at::Tensor grad_o_pairs = pairs ? in.grad_o.to(at::kBFloat16) : at::Tensor();
    const auto bits = [pairs](const at::Tensor& x) {
      return pairs ? reinterpret_cast<const uint16_t*>(x.const_data_ptr<c10::BFloat16>()) : nullptr;
    };
    const AttentionGrads g{pairs ? nullptr : in.grad_o.const_data_ptr<float>(),
                           delta.const_data_ptr<float>(),
                           bits(t.q),
                           bits(t.k),
                           bits(t.v),
                           bits(grad_o_pairs),
                           grad_q.mutable_data_ptr(),
                           grad_k.mutable_data_ptr(),
                           grad_v.mutable_data_ptr(),
                           grad_type,
                           grad_s.defined() ? grad_s.mutable_data_ptr<float>() : nullptr,
                           copies,
                           copy_shape[0],
                           copy_shape[1],
                           copy_shape[2],
                           stored ? stored_grad.mutable_data_ptr() : nullptr,
                           t.mask_grad_dtype,
                           stored && t.mask_grad_dtype == at::kFloat &&
                               stored_grad.numel() * static_cast<int64_t>(sizeof(float)) >= kStreamingStoreMinBytes};
    attention_backward_impl(p, g, pairs);
  }
  std::optional<at::Tensor> mask_grad;
  if (stored) {
    mask_grad = stored_grad;
  } else if (grad_mask) {
    mask_grad = attention_mask_grad(t, (copies > 1 ? grad_s.sum(0) : grad_s[0]).sum_to_size(mask_shape));
  }
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), mask_grad, attention_sink_grad(t, delta, in.lse)};
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const std::optional<at::Tensor>& attn_mask,
                                                         const std::optional<at::Tensor>& alibi_slopes, double scale,
                                                         double softcap, int64_t band_lo, int64_t band_hi,
                                                         double dropout_p, int64_t seed, int64_t offset,
                                                         bool /*deterministic*/, bool float_o,
                                                         const std::optional<at::Tensor>& sinks,
                                                         const std::optional<at::Tensor>& qv) {
  AttentionTensors t = prepare_attention(q, k, v, attn_mask, alibi_slopes, /*as_float=*/false);
  set_attention_sinks(kAttentionOp, t, sinks, q.size(1), q);
  set_attention_qv(kAttentionOp, t, qv, q, v);
  return forward(std::move(t), float_o ? at::kFloat : q.scalar_type(), scale, softcap, band_lo, band_hi, dropout_p,
                 seed, offset);
}

AttentionBackwardResult attention_backward_cpu(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t band_lo, int64_t band_hi,
    double dropout_p, int64_t seed, int64_t offset, bool grad_mask, bool /*deterministic: always, here*/,
    const std::optional<at::Tensor>& sinks) {
  const char* op = "genfast.attention_backward";
  AttentionTensors t = prepare_attention(q, k, v, attn_mask, alibi_slopes, /*as_float=*/!backward_takes_pairs(q, v));
  set_attention_sinks(op, t, sinks, q.size(1), q);
  return backward(op, t, q.scalar_type(), grad_o, grad_lse, o, lse, scale, softcap, band_lo, band_hi, dropout_p, seed,
                  offset, grad_mask);
}

// The CPU kernels read cu_seqlens, seqused_k and block_table directly: their values are checked
// here, where that costs nothing.
AttentionTensors prepare_varlen_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                    int64_t max_seqlen_q, int64_t max_seqlen_k,
                                    const std::optional<at::Tensor>& alibi_slopes,
                                    const std::optional<at::Tensor>& seqused_k,
                                    const std::optional<at::Tensor>& block_table, bool as_float) {
  const AttentionTensors t = prepare_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, alibi_slopes, seqused_k, block_table, as_float);
  const char* op = kAttentionVarlenOp;
  const bool paged = t.block_table.defined();
  // With seqused_k (unpaged), max_seqlen_k bounds the keys used, as FlashAttention 3 takes it (the
  // kernels reach no key past them), not the rows holding them.
  const bool k_rows_bounded = paged || !t.seqused_k.defined();
  for (const auto& [cu, total, most, name] :
       {std::tuple{&t.cu_seqlens_q, t.q.size(0), t.max_seqlen_q, "cu_seqlens_q"},
        std::tuple{&t.cu_seqlens_k, paged ? int64_t{-1} : t.k.size(0),
                   k_rows_bounded ? t.max_seqlen_k : std::numeric_limits<int64_t>::max(), "cu_seqlens_k"}}) {
    const int32_t* c = cu->const_data_ptr<int32_t>();
    const int64_t n = cu->size(0);
    // A paged cache's keys are where block_table puts them: cu_seqlens_k gives their counts alone.
    TORCH_CHECK(c[0] == 0 && (total < 0 || c[n - 1] == total), op, ": ", name, " must run from 0",
                total < 0 ? std::string() : " to " + std::to_string(total), ", got ", c[0], " .. ", c[n - 1]);
    for (int64_t b = 0; b + 1 < n; ++b) {
      TORCH_CHECK(c[b + 1] >= c[b], op, ": ", name, " must not decrease; sequence ", b, " has length ",
                  c[b + 1] - c[b]);
      TORCH_CHECK(c[b + 1] - c[b] <= most, op, ": ", name, " must rise by at most max_seqlen (", most,
                  ") a step; sequence ", b, " has length ", c[b + 1] - c[b]);
    }
  }
  if (t.seqused_k.defined()) {
    const int32_t *used = t.seqused_k.const_data_ptr<int32_t>(), *c = t.cu_seqlens_k.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < t.seqused_k.size(0); ++b) {
      TORCH_CHECK(used[b] >= 0 && used[b] <= c[b + 1] - c[b], op, ": seqused_k[", b, "] must be in 0 .. ",
                  c[b + 1] - c[b], " (the rows cu_seqlens_k gives sequence ", b, "), got ", used[b]);
      TORCH_CHECK(used[b] <= t.max_seqlen_k, op, ": seqused_k[", b, "] must be at most max_seqlen_k (",
                  t.max_seqlen_k, "), got ", used[b]);
    }
  }
  if (paged) {
    const int32_t *table = t.block_table.const_data_ptr<int32_t>(), *c = t.cu_seqlens_k.const_data_ptr<int32_t>();
    const int64_t pages = t.k.size(0), page_size = t.k.size(1), per_sequence = t.block_table.size(1);
    for (int64_t b = 0; b + 1 < t.cu_seqlens_k.size(0); ++b) {
      // At most per_sequence pages: each length is at most max_seqlen_k (checked above), which fits a row.
      const int64_t used_pages = (c[b + 1] - c[b] + page_size - 1) / page_size;
      for (int64_t n = 0; n < used_pages; ++n) {
        const int32_t page = table[b * per_sequence + n];
        TORCH_CHECK(page >= 0 && page < pages, op, ": block_table[", b, ", ", n, "] must name one of the cache's ",
                    pages, " pages, got ", page);
      }
    }
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t band_lo, int64_t band_hi,
    double dropout_p, int64_t seed, int64_t offset, bool /*deterministic*/, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& seqused_k, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& qv) {
  AttentionTensors t = prepare_varlen_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          alibi_slopes, seqused_k, block_table, /*as_float=*/false);
  set_attention_sinks(kAttentionVarlenOp, t, sinks, q.size(1), q);
  set_attention_qv(kAttentionVarlenOp, t, qv, q, v);
  return forward(std::move(t), q.scalar_type(), scale, softcap, band_lo, band_hi, dropout_p, seed, offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> attention_varlen_backward_cpu(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t band_lo, int64_t band_hi,
    double dropout_p, int64_t seed, int64_t offset, bool /*deterministic: always, here*/,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& seqused_k) {
  const char* op = "genfast.attention_varlen_backward";
  AttentionTensors t = prepare_varlen_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          alibi_slopes, seqused_k, std::nullopt,
                                          /*as_float=*/!backward_takes_pairs(q, v));
  set_attention_sinks(op, t, sinks, q.size(1), q);
  auto [grad_q, grad_k, grad_v, no_mask_grad, grad_sinks] = backward(
      op, t, q.scalar_type(), grad_o, grad_lse, o, lse, scale, softcap, band_lo, band_hi, dropout_p, seed, offset,
      false);
  return {grad_q, grad_k, grad_v, grad_sinks};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_varlen_forward", &attention_varlen_forward_cpu);
  m.impl("attention_varlen_backward", &attention_varlen_backward_cpu);
}

}  // namespace genfast
