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

// Words 0 .. n of src (n <= kCols), zeros after them.
GF_PAIRS_INLINE __m512i load_words(const uint16_t* src, int64_t n) {
  return _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1u), src);
}

// The panel pairs deep and width wide (a multiple of kCols) whose column c holds row c of src (count
// rows stride apart, 2 * pairs bfloat16 each, their pairs as they lie), zeros past count: the K^T of
// a block of keys, each key's head dim taken in pairs. 16 x 16 blocks of words transposed in
// registers.
GF_CPU_TARGET_AVX512_BF16 inline void pack_pairs_transposed(const uint16_t* src, int64_t stride, int64_t count,
                                                            int64_t pairs, uint32_t* panel, int64_t width) {
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

// The panel total / 2 deep and width wide (a multiple of kCols) whose word (t, c) pairs src[2t][c]
// and src[2t + 1][c] (rows stride apart, dim elements each, count rows; zeros past count and dim):
// the V of a block of keys, taken in pairs of keys. total is even.
GF_CPU_TARGET_AVX512_BF16 inline void pack_pairs_interleaved(const uint16_t* src, int64_t stride, int64_t count,
                                                             int64_t dim, uint32_t* panel, int64_t width,
                                                             int64_t total) {
  typedef Bits16<kCols>::Halves Halves;
  typedef Bits16<kCols>::Words Words;
  const auto load = [](Halves& h, const uint16_t* row, size_t bytes) {  // a whole row's load is one move
    bytes == sizeof(h) ? memcpy(&h, row, sizeof(h)) : memcpy(&h, row, bytes);
  };
  const int64_t pairs = total / 2;
  for (int64_t d0 = 0; d0 < width; d0 += kCols) {
    const size_t bytes = static_cast<size_t>(std::clamp<int64_t>(dim - d0, 0, kCols)) * sizeof(uint16_t);
    uint32_t* chunk = panel + d0 * pairs;
    for (int64_t t = 0; t < pairs; ++t) {
      Halves lower{}, upper{};  // keys 2t and 2t + 1, zeros past count and dim
      if (2 * t < count) load(lower, src + 2 * t * stride + d0, bytes);
      if (2 * t + 1 < count) load(upper, src + (2 * t + 1) * stride + d0, bytes);
      const Words words = __builtin_convertvector(lower, Words) | __builtin_convertvector(upper, Words) << 16;
      memcpy(chunk + t * kCols, &words, sizeof(words));
    }
  }
}

// Row r of dst (dst_row words apart) = row r of src (src_row floats apart, n floats, n even) rounded
// to bfloat16, for r < rows: the rows of A of a product on pairs.
GF_CPU_TARGET_AVX512_BF16 inline void round_rows_to_pairs(const float* src, int64_t src_row, int64_t rows, int64_t n,
                                                          uint32_t* dst, int64_t dst_row) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = src + r * src_row;
    uint32_t* out = dst + r * dst_row;
    for (int64_t e = 0; e < n; e += 2 * kCols) {
      const int64_t left = std::min<int64_t>(2 * kCols, n - e);
      const __m512 lower = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << std::min<int64_t>(left, kCols)) - 1u), in + e);
      const __m512 upper =
          _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << std::max<int64_t>(left - kCols, 0)) - 1u), in + e + kCols);
      const __m512bh rounded = _mm512_cvtne2ps_pbh(upper, lower);
      __m512i words;
      memcpy(&words, &rounded, sizeof(words));
      _mm512_mask_storeu_epi32(out + e / 2, static_cast<__mmask16>((1u << (left / 2)) - 1u), words);
    }
  }
}

// out[r][c] (+)= factor * sum over t < pairs of a_r[t] . panel[t][c] for c < kCols, r < count <= Rows
// (a's rows past count are computed, not stored; they must be readable), t in order.
template <int Rows>
GF_PAIRS_INLINE void pair_product_rows(const uint32_t* const a[Rows], const uint32_t* __restrict panel, int64_t pairs,
                                       int64_t count, float* out, int64_t out_stride, bool accumulate, float factor) {
  __m512 sums[Rows];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) sums[r] = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    __m512bh p;
    const __m512i words = _mm512_loadu_si512(panel + t * kCols);
    memcpy(&p, &words, sizeof(p));
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      __m512bh x;
      const __m512i broadcast = _mm512_set1_epi32(static_cast<int>(a[r][t]));
      memcpy(&x, &broadcast, sizeof(x));
      sums[r] = _mm512_dpbf16_ps(sums[r], x, p);
    }
  }
  const __m512 scale = _mm512_set1_ps(factor);
  for (int r = 0; r < Rows && r < count; ++r) {
    float* row = out + r * out_stride;
    const __m512 product = _mm512_mul_ps(scale, sums[r]);
    _mm512_storeu_ps(row, accumulate ? _mm512_add_ps(_mm512_loadu_ps(row), product) : product);
  }
}

template <int Rows>
GF_PAIRS_INLINE void pair_multiply_rows(const uint32_t* a, int64_t a_row, int64_t r0, int64_t count,
                                        const uint32_t* panel, int64_t pairs, float* out, int64_t out_stride,
                                        int64_t width, bool accumulate, float factor) {
  const uint32_t* a_rows[Rows];
  for (int r = 0; r < Rows; ++r) a_rows[r] = a + std::min<int64_t>(r0 + r, count - 1) * a_row;
  for (int64_t c0 = 0; c0 < width; c0 += kCols) {
    pair_product_rows<Rows>(a_rows, panel + c0 * pairs, pairs, count - r0, out + r0 * out_stride + c0, out_stride,
                            accumulate, factor);
  }
}

// out[r][c] (+)= factor * sum over t < pairs of a[r * a_row + t] . panel[t][c] for r < count and c <
// width (a multiple of kCols): attention.cpp's multiply on pairs, in tiles of 16, 8, 4 and 1 rows.
GF_CPU_TARGET_AVX512_BF16 inline void pair_multiply(const uint32_t* a, int64_t a_row, int64_t count,
                                                    const uint32_t* panel, int64_t pairs, float* out,
                                                    int64_t out_stride, int64_t width, bool accumulate, float factor) {
  int64_t r0 = 0;
  for (; r0 + 16 <= count; r0 += 16) {
    pair_multiply_rows<16>(a, a_row, r0, count, panel, pairs, out, out_stride, width, accumulate, factor);
  }
  for (; r0 + 4 < count; r0 += 8) {
    pair_multiply_rows<8>(a, a_row, r0, count, panel, pairs, out, out_stride, width, accumulate, factor);
  }
  for (; r0 + 1 < count; r0 += 4) {
    pair_multiply_rows<4>(a, a_row, r0, count, panel, pairs, out, out_stride, width, accumulate, factor);
  }
  for (; r0 < count; ++r0) {
    pair_multiply_rows<1>(a, a_row, r0, count, panel, pairs, out, out_stride, width, accumulate, factor);
  }
}

}  // namespace
}  // namespace genfast

#else
#define GF_HAS_BFLOAT16_PAIRS 0
#endif
