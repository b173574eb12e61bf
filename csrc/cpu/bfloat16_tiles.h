// Matrix products on bfloat16 pairs in AMX tiles, for CPUs with AMX-BF16 (capability avx512_amx):
// tdpbf16ps adds a 16-row tile of A (16 pairs a row) times a tile of B (16 pairs deep, 16 columns)
// to 16 x 16 float32 sums, 256 times the products of one vdpbf16ps. The panels of bfloat16_pairs.h
// are B's tiles where they lie: a column chunk's rows of 16 words, 64 bytes apart. A's rows must lie
// one after another (PairRows of step 1: an A that is a panel's columns is turned into rows first,
// panel_columns_as_rows); the rows past the last whole tile and the pairs past the last whole 16
// take bfloat16_pairs.h's vector products.
// The instruction treats subnormal inputs as zeros and rounds to nearest even, as vdpbf16ps does;
// its sums of a tile's pairs are taken in another order.
#pragma once

#include "bfloat16_pairs.h"

#if GF_HAS_BFLOAT16_PAIRS
namespace genfast {
namespace {

constexpr int64_t kTileSide = 16;  // a tile's rows; and its pairs (A) or columns (B, sums)

// Whether the products take AMX tiles (multiply_pairs) where their A's rows lie one after another.
inline bool takes_tiles() { return GF_HAS_AMX_TILES && cpu_capability() == CpuCapability::kAvx512Amx; }

// Whether a product of count rows of A over `pairs` pairs takes tiles (given A's rows one after
// another): at least one whole tile of rows and of pairs.
inline bool product_takes_tiles(int64_t count, int64_t pairs) {
  return takes_tiles() && count >= kTileSide && pairs >= kTileSide;
}

// rows[c][t] = panel[t][c] for c < width and t < pairs (rows `pairs` words apart): a panel's columns
// as the rows of an A that tiles take (a tile's rows are read whole, not down a column). 16 x 16
// blocks of words transposed in registers.
GF_CPU_TARGET_AVX512_BF16 inline void panel_columns_as_rows(const uint32_t* panel, int64_t pairs, int64_t width,
                                                            uint32_t* rows) {
  for (int64_t c0 = 0; c0 < width; c0 += kCols) {
    const uint32_t* chunk = panel + c0 * pairs;
    for (int64_t t0 = 0; t0 < pairs; t0 += kCols) {
      const int64_t n = std::min<int64_t>(kCols, pairs - t0);
      Floats16<16> block[kCols];  // bits moved, never computed on
      for (int64_t t = 0; t < kCols; ++t) {
        const __m512i words = t < n ? _mm512_loadu_si512(chunk + (t0 + t) * kCols) : _mm512_setzero_si512();
        memcpy(&block[t], &words, sizeof(words));
      }
      transpose16(block);
      for (int64_t c = 0; c < kCols; ++c) {
        __m512i words;
        memcpy(&words, &block[c], sizeof(words));
        _mm512_mask_storeu_epi32(rows + (c0 + c) * pairs + t0, first_lanes(n), words);
      }
    }
  }
}

}  // namespace
}  // namespace genfast
#else
namespace genfast {
namespace {
inline bool takes_tiles() { return false; }
}  // namespace
}  // namespace genfast
#endif

#if GF_HAS_BFLOAT16_PAIRS && GF_HAS_AMX_TILES
#define GF_CPU_TARGET_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace genfast {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Tiles 0 to 3 hold sums, 4 and 5 rows of A, 6 and 7 chunks of B: all 16 rows of 64 bytes. Loaded
// on each product: other code on the thread (oneDNN's) may have configured the tiles since.
GF_CPU_TARGET_AMX inline void configure_tiles() {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTileSide;
    config.bytes_per_row[t] = 64;
  }
  // g++ counts neither ldtilecfg as reading config nor the tile loads that follow as reading memory:
  // the barrier keeps config's stores, and the panels' and rows' stores before the loads.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// sums (RowTiles x 16 rows, ColTiles x 16 columns, 32 floats a row) = A's rows from a (a_row words
// apart) times the panel's chunks from panel (pairs deep, each pairs * 16 words), over the first
// `whole` pairs (a multiple of 16). Two rows of tiles by two columns hold four sums and the four
// tiles that feed them, each A tile serving two products and each B tile two.
template <int RowTiles, int ColTiles>
GF_CPU_TARGET_AMX inline void tile_sums(const uint32_t* a, int64_t a_row, const uint32_t* panel, int64_t pairs,
                                        int64_t whole, float* sums) {
  constexpr int64_t kSumsRow = 2 * kTileSide * sizeof(float);
  const int64_t a_bytes = a_row * static_cast<int64_t>(sizeof(uint32_t));
  _tile_zero(0);
  if constexpr (ColTiles > 1) _tile_zero(1);
  if constexpr (RowTiles > 1) _tile_zero(2);
  if constexpr (RowTiles > 1 && ColTiles > 1) _tile_zero(3);
  for (int64_t t0 = 0; t0 < whole; t0 += kTileSide) {
    _tile_loadd(4, a + t0, a_bytes);
    _tile_loadd(6, panel + t0 * kCols, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (ColTiles > 1) {
      _tile_loadd(7, panel + pairs * kCols + t0 * kCols, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (RowTiles > 1) {
      _tile_loadd(5, a + kTileSide * a_row + t0, a_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (ColTiles > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, sums, kSumsRow);
  if constexpr (ColTiles > 1) _tile_stored(1, sums + kTileSide, kSumsRow);
  if constexpr (RowTiles > 1) _tile_stored(2, sums + kTileSide * 2 * kTileSide, kSumsRow);
  if constexpr (RowTiles > 1 && ColTiles > 1) _tile_stored(3, sums + kTileSide * 2 * kTileSide + kTileSide, kSumsRow);
}

// pair_multiply's product for A's rows one after another (a.step 1), its first count / 16 * 16 rows
// in tiles and the rest in vectors: out[r][c] (+)= factor * sum over t < pairs of a_r[t] . panel[t][c]
// for r < count and c < width (a multiple of kCols).
__attribute__((noinline)) GF_CPU_TARGET_AMX void tile_multiply(const PairRows& a, int64_t count,
                                                               const uint32_t* panel, int64_t pairs, float* out,
                                                               int64_t out_stride, int64_t width, bool accumulate,
                                                               float factor) {
  const int64_t tiled_rows = count / kTileSide * kTileSide, whole = pairs / kTileSide * kTileSide;
  alignas(64) float sums[2 * kTileSide * 2 * kTileSide];
  configure_tiles();
  for (int64_t r0 = 0; r0 < tiled_rows; r0 += 2 * kTileSide) {
    const int64_t rows = std::min(2 * kTileSide, tiled_rows - r0);
    for (int64_t c0 = 0; c0 < width; c0 += 2 * kCols) {
      const int64_t cols = std::min<int64_t>(2 * kCols, width - c0);
      const uint32_t* chunk = panel + c0 * pairs;
      if (rows > kTileSide) {
        cols > kCols ? tile_sums<2, 2>(a.at(r0), a.row, chunk, pairs, whole, sums)
                     : tile_sums<2, 1>(a.at(r0), a.row, chunk, pairs, whole, sums);
      } else {
        cols > kCols ? tile_sums<1, 2>(a.at(r0), a.row, chunk, pairs, whole, sums)
                     : tile_sums<1, 1>(a.at(r0), a.row, chunk, pairs, whole, sums);
      }
      if (whole < pairs) {  // the last pairs, in vectors, added to the tiles' sums
        for (int64_t r = 0; r < rows; r += 8) {
          const uint32_t* a_rows[8];
          for (int i = 0; i < 8; ++i) a_rows[i] = a.at(r0 + r + i) + whole;
          for (int64_t c = 0; c < cols; c += kCols) {
            pair_product_rows<8, 1>(a_rows, 1, chunk + c * pairs + whole * kCols, pairs - whole, 8,
                                    sums + r * 2 * kTileSide + c, 2 * kTileSide, true, 1.0f);
          }
        }
      }
      const __m512 scale = _mm512_set1_ps(factor);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; c += kCols) {
          float* row = out + (r0 + r) * out_stride + c0 + c;
          const __m512 product = _mm512_mul_ps(scale, _mm512_load_ps(sums + r * 2 * kTileSide + c));
          _mm512_storeu_ps(row, accumulate ? _mm512_add_ps(_mm512_loadu_ps(row), product) : product);
        }
      }
    }
  }
  _tile_release();
  if (tiled_rows < count) {
    pair_multiply(PairRows{a.at(tiled_rows), a.row, 1, a.chunk}, count - tiled_rows, panel, pairs,
                  out + tiled_rows * out_stride, out_stride, width, accumulate, factor);
  }
}

}  // namespace
}  // namespace genfast

#endif

#if GF_HAS_BFLOAT16_PAIRS
namespace genfast {
namespace {

// out[r][c] (+)= factor * sum over t < pairs of a_r[t] . panel[t][c] for r < count and c < width (a
// multiple of kCols): in AMX tiles where the CPU has them and A has a tile of rows one after another
// and 16 pairs, else pair_multiply's vectors.
GF_CPU_TARGET_AVX512_BF16 inline void multiply_pairs(const PairRows& a, int64_t count, const uint32_t* panel,
                                                     int64_t pairs, float* out, int64_t out_stride, int64_t width,
                                                     bool accumulate, float factor) {
#if GF_HAS_AMX_TILES
  if (a.step == 1 && a.chunk == kCols * a.row && product_takes_tiles(count, pairs)) {
    tile_multiply(a, count, panel, pairs, out, out_stride, width, accumulate, factor);
    return;
  }
#endif
  pair_multiply(a, count, panel, pairs, out, out_stride, width, accumulate, factor);
}

}  // namespace
}  // namespace genfast
#endif
