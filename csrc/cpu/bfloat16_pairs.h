// Matrix products on bfloat16 numbers taken in pairs, for CPUs with AVX512-BF16 (capability
// avx512_bf16): vdpbf16ps adds a0 * b0 + a1 * b1 to each float32 lane, twice the products of a
// float32 FMA per instruction. A panel here holds 32-bit words, each a pair of bfloat16 numbers (the
// lower one first, as in memory) along the product's depth, in column chunks of kCols as the float
// panels of attention.cpp: word (t, c) at (c / kCols) * depth * kCols + t * kCols + c % kCols, depth
// counted in pairs. The instruction treats subnormal inputs as zeros and rounds to nearest even,
// whatever MXCSR says; NaN and infinities propagate.
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>

#include "cpu_features.h"
#include "cpu_vectors.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GF_HAS_BFLOAT16_PAIRS 1
#define GF_CPU_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c")))
#define GF_PAIRS_INLINE GF_CPU_TARGET_AVX512_BF16 inline __attribute__((always_inline))

namespace genfast {
namespace {

GF_PAIRS_INLINE __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// The first n words of a row (n <= kCols), zeros after them: pairs of bfloat16 as they lie, or of
// floats (2n of them) rounded to bfloat16.
GF_PAIRS_INLINE __m512i load_words(const uint16_t* src, int64_t n) {
  return _mm512_maskz_loadu_epi32(first_lanes(n), src);
}
GF_PAIRS_INLINE __m512i load_words(const float* src, int64_t n) {
  const __m512 lower = _mm512_maskz_loadu_ps(first_lanes(std::min<int64_t>(2 * n, kCols)), src);
  const __m512 upper = _mm512_maskz_loadu_ps(first_lanes(std::max<int64_t>(2 * n - kCols, 0)), src + kCols);
  const __m512bh rounded = _mm512_cvtne2ps_pbh(upper, lower);
  __m512i words;
  memcpy(&words, &rounded, sizeof(words));
  return words;
}

// The first n numbers of a row (n <= kCols) as bfloat16 bits, zeros after them: as they lie, or
// floats rounded.
GF_PAIRS_INLINE void load_halves(const uint16_t* src, int64_t n, Bits16<kCols>::Halves& out) {
  const __m256i h = _mm256_maskz_loadu_epi16(first_lanes(n), src);
  memcpy(&out, &h, sizeof(out));
}
GF_PAIRS_INLINE void load_halves(const float* src, int64_t n, Bits16<kCols>::Halves& out) {
  const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(first_lanes(n), src));
  memcpy(&out, &rounded, sizeof(out));
}

// The panel pairs deep and width wide (a multiple of kCols) whose column c holds row c of src (count
// rows stride apart, 2 * pairs numbers each, taken in pairs as they lie), zeros past count: the K^T
// of a block of keys, each key's head dim in pairs. T is uint16_t (bfloat16 bits) or float (rounded
// to bfloat16). 16 x 16 blocks of words transposed in registers.
template <typename T>
GF_CPU_TARGET_AVX512_BF16 void pack_pairs_transposed(const T* src, int64_t stride, int64_t count, int64_t pairs,
                                                     uint32_t* panel, int64_t width) {
  for (int64_t c0 = 0; c0 < width; c0 += kCols) {
    const int64_t rows = std::clamp<int64_t>(count - c0, 0, kCols);
    uint32_t* chunk = panel + c0 * pairs;
    for (int64_t t0 = 0; t0 < pairs; t0 += kCols) {
      const int64_t n = std::min<int64_t>(kCols, pairs - t0);
      Floats16<16> block[kCols];  // bits moved, never computed on
      for (int64_t c = 0; c < kCols; ++c) {
        const __m512i words = c < rows ? load_words(src + (c0 + c) * stride + 2 * t0, n) : _mm512_setzero_si512();
        memcpy(&block[c], &words, sizeof(words));
      }
      transpose16(block);
      for (int64_t t = 0; t < n; ++t) memcpy(chunk + (t0 + t) * kCols, &block[t], sizeof(block[t]));
    }
  }
}

// The panel (count + 1) / 2 deep and width wide (a multiple of kCols) whose word (t, c) pairs
// src[2t][c] and src[2t + 1][c] (rows stride apart, dim numbers each, count rows; zeros past count
// and dim), down to depth / 2 (depth even, at least count; zeros past count): the V of a block of
// keys in pairs of keys. T as pack_pairs_transposed's.
template <typename T>
GF_CPU_TARGET_AVX512_BF16 void pack_pairs_interleaved(const T* src, int64_t stride, int64_t count, int64_t dim,
                                                      uint32_t* panel, int64_t width, int64_t depth) {
  typedef Bits16<kCols>::Halves Halves;
  typedef Bits16<kCols>::Words Words;
  const int64_t pairs = depth / 2;
  for (int64_t d0 = 0; d0 < width; d0 += kCols) {
    const int64_t n = std::clamp<int64_t>(dim - d0, 0, kCols);
    uint32_t* chunk = panel + d0 * pairs;
    for (int64_t t = 0; t < pairs; ++t) {
      Halves lower{}, upper{};  // rows 2t and 2t + 1, zeros past count and dim
      if (2 * t < count) load_halves(src + 2 * t * stride + d0, n, lower);
      if (2 * t + 1 < count) load_halves(src + (2 * t + 1) * stride + d0, n, upper);
      const Words words = __builtin_convertvector(lower, Words) | __builtin_convertvector(upper, Words) << 16;
      memcpy(chunk + t * kCols, &words, sizeof(words));
    }
  }
}

// Row r of dst (dst_row words apart) = row r of src (src_row numbers apart, n of them, n even) in
// pairs, for r < rows: the rows of A of a product on pairs. T as pack_pairs_transposed's.
template <typename T>
GF_CPU_TARGET_AVX512_BF16 void round_rows_to_pairs(const T* src, int64_t src_row, int64_t rows, int64_t n,
                                                   uint32_t* dst, int64_t dst_row) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t e = 0; e < n; e += 2 * kCols) {
      const int64_t words = std::min<int64_t>(kCols, (n - e) / 2);
      _mm512_mask_storeu_epi32(dst + r * dst_row + e / 2, first_lanes(words), load_words(src + r * src_row + e, words));
    }
  }
}

// The rows of A of a product on pairs: row r at a + (r / kCols) * chunk + (r % kCols) * row, its
// words step apart. Rows one after another have chunk = kCols * row; a panel's columns (A = the
// panel's transpose) have row 1, step kCols and chunk kCols * depth.
struct PairRows {
  const uint32_t* a;
  int64_t row, step, chunk;
  const uint32_t* at(int64_t r) const { return a + r / kCols * chunk + r % kCols * row; }
};

// out[r][c] (+)= factor * sum over t < pairs of a_r[t] . panel[t][c] for c < Chunks * kCols, r < count
// <= Rows (a's rows past count are computed, not stored; they must be readable), t in order; the
// panel's chunks pairs * kCols words apart.
template <int Rows, int Chunks>
GF_PAIRS_INLINE void pair_product_rows(const uint32_t* const a[Rows], int64_t a_step, const uint32_t* __restrict panel,
                                       int64_t pairs, int64_t count, float* out, int64_t out_stride, bool accumulate,
                                       float factor) {
  __m512 sums[Rows][Chunks];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < Chunks; ++c) sums[r][c] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < pairs; ++t) {
    __m512bh p[Chunks];
#pragma GCC unroll 4
    for (int c = 0; c < Chunks; ++c) {
      const __m512i words = _mm512_loadu_si512(panel + c * pairs * kCols + t * kCols);
      memcpy(&p[c], &words, sizeof(p[c]));
    }
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      __m512bh x;
      const __m512i broadcast = _mm512_set1_epi32(static_cast<int>(a[r][t * a_step]));
      memcpy(&x, &broadcast, sizeof(x));
#pragma GCC unroll 4
      for (int c = 0; c < Chunks; ++c) sums[r][c] = _mm512_dpbf16_ps(sums[r][c], x, p[c]);
    }
  }
  const __m512 scale = _mm512_set1_ps(factor);
  for (int r = 0; r < Rows && r < count; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < Chunks; ++c) {
      float* row = out + r * out_stride + c * kCols;
      const __m512 product = _mm512_mul_ps(scale, sums[r][c]);
      _mm512_storeu_ps(row, accumulate ? _mm512_add_ps(_mm512_loadu_ps(row), product) : product);
    }
  }
}

// Rows r0 .. r0 + Rows of pair_multiply's product, two column chunks at a time, one for a chunk left
// over. Each word of A broadcast feeds two instructions: with one chunk at a time (16 rows), a
// broadcast per instruction held the products to 70-80% of vdpbf16ps's peak on Zen 4; two chunks of
// 8 rows reach 95%.
template <int Rows>
GF_PAIRS_INLINE void pair_multiply_rows(const PairRows& a, int64_t r0, int64_t count, const uint32_t* panel,
                                        int64_t pairs, float* out, int64_t out_stride, int64_t width, bool accumulate,
                                        float factor) {
  const uint32_t* a_rows[Rows];
  for (int r = 0; r < Rows; ++r) a_rows[r] = a.at(std::min<int64_t>(r0 + r, count - 1));
  int64_t c0 = 0;
  for (; c0 + 2 * kCols <= width; c0 += 2 * kCols) {
    pair_product_rows<Rows, 2>(a_rows, a.step, panel + c0 * pairs, pairs, count - r0, out + r0 * out_stride + c0,
                               out_stride, accumulate, factor);
  }
  for (; c0 < width; c0 += kCols) {
    pair_product_rows<Rows, 1>(a_rows, a.step, panel + c0 * pairs, pairs, count - r0, out + r0 * out_stride + c0,
                               out_stride, accumulate, factor);
  }
}

// out[r][c] (+)= factor * sum over t < pairs of a_r[t] . panel[t][c] for r < count and c < width (a
// multiple of kCols): attention.cpp's multiply on pairs, in tiles of 8, 4 and 1 rows.
GF_CPU_TARGET_AVX512_BF16 inline void pair_multiply(const PairRows& a, int64_t count, const uint32_t* panel,
                                                    int64_t pairs, float* out, int64_t out_stride, int64_t width,
                                                    bool accumulate, float factor) {
  int64_t r0 = 0;
  for (; r0 + 8 <= count; r0 += 8) {
    pair_multiply_rows<8>(a, r0, count, panel, pairs, out, out_stride, width, accumulate, factor);
  }
  for (; r0 + 1 < count; r0 += 4) {
    pair_multiply_rows<4>(a, r0, count, panel, pairs, out, out_stride, width, accumulate, factor);
  }
  for (; r0 < count; ++r0) {
    pair_multiply_rows<1>(a, r0, count, panel, pairs, out, out_stride, width, accumulate, factor);
  }
}

// PairRows of rows one after another, row words apart.
inline PairRows pair_rows(const uint32_t* a, int64_t row) { return PairRows{a, row, 1, kCols * row}; }

}  // namespace
}  // namespace genfast

#else
#define GF_HAS_BFLOAT16_PAIRS 0
#endif
