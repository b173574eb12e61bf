// The register-blocked product at the heart of the CPU kernels that multiply matrices (MADE's
// masked layer, attention): a few rows of A against a panel of kCols columns.
#pragma once

#include <stdint.h>

#include "cpu_features.h"
#include "cpu_vectors.h"

namespace genfast {
namespace {

// The rows of A whose products one register tile holds: as many as their accumulators and a panel
// row fit in the vector registers. A row of 16 floats takes one register with AVX-512 (of 32), two
// with AVX2 (of 16), four with SSE (of 16) and NEON (of 32).
template <CpuCapability isa>
constexpr int kTileRows = isa == CpuCapability::kAvx512 ? 16
                          : isa == CpuCapability::kAvx2 ? 6
#if defined(__aarch64__)
                                                        : 6;
#else
                                                        : 2;
#endif

// acc[r] = sum over t < len of a[r][t * a_step] * panel[t * panel_stride + (0 .. kCols)], t in order,
// for r < Rows. The loops over rows unroll completely, so the accumulators stay in registers; a's
// elements are broadcast one at a time, so their stride costs nothing. Inlined into callers
// compiled for one instruction set, whose epilogue then takes acc from registers.
template <CpuCapability isa, int Rows>
GF_CPU_INLINE void block_product_rows(const float* const a[Rows], int64_t a_step, const float* __restrict panel,
                                      int64_t panel_stride, int64_t len, Floats<isa> acc[Rows]) {
  Floats<isa> sums[Rows];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) sums[r] = Floats<isa>{};
  for (int64_t t = 0; t < len; ++t) {
    const Floats<isa> p = load16<kVectorLanes<isa>>(panel + t * panel_stride);
    const int64_t i = t * a_step;
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) sums[r] += a[r][i] * p;
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) acc[r] = sums[r];
}

// out[r][c] (+)= factor * sum_t a[r][t * a_step] * panel[t][c] for c < kCols, and r < count where
// count <= Rows (a's rows past count, which are computed but not stored, must be readable).
template <CpuCapability isa, int Rows>
GF_CPU_INLINE void block_product_to(const float* const a[Rows], int64_t a_step, const float* __restrict panel,
                                    int64_t panel_stride, int64_t len, int64_t count, float* out,
                                    int64_t out_stride, bool accumulate, float factor) {
  Floats<isa> tile[Rows];
  block_product_rows<isa, Rows>(a, a_step, panel, panel_stride, len, tile);
  for (int r = 0; r < Rows && r < count; ++r) {
    float* row = out + r * out_stride;
    const Floats<isa> product = factor * tile[r];
    store16(row, accumulate ? load16<kVectorLanes<isa>>(row) + product : product);
  }
}

// The rows of a register tile over two panels at once (0: none), each broadcast of a feeding two
// products: 8 rows take 10 loads for 16 products and 8 row pointers, where a tile of 16 rows over
// one panel takes 17 loads for 16 and 16 row pointers, more than the general registers. On an Intel
// Xeon (AMX, AVX-512; 2 threads) this took the float32 attention forward at B=2 H=8 L=1024 D=64 from
// 21.3 ms to 17.4 ms and its forward+backward from 76.9 ms to 58.5 ms (medians of alternating runs
// in one process); tiles of 10 and 12 rows over two panels ran slower than either.
template <CpuCapability isa>
constexpr int kPairTileRows = isa == CpuCapability::kAvx512 ? 8 : 0;

// One step t of block_product_rows_pair: a's elements at i against the panels' row t.
template <CpuCapability isa, int Rows>
GF_CPU_INLINE void pair_step(const float* const a[Rows], int64_t i, const float* __restrict p0_row,
                             const float* __restrict p1_row, Floats<isa> sums0[Rows], Floats<isa> sums1[Rows]) {
  const Floats<isa> p0 = load16<kVectorLanes<isa>>(p0_row), p1 = load16<kVectorLanes<isa>>(p1_row);
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    const float x = a[r][i];
    sums0[r] += x * p0;
    sums1[r] += x * p1;
  }
}

// acc0[r] and acc1[r]: block_product_rows over panel0 and panel1 (same stride and depth), each
// element's sum over t in the same order, so the same bits as two calls. With a unit step (every
// caller but one) t goes four at a time, so that a's row pointers move once per four steps, not
// once per step each: g++ otherwise spends about 12 scalar instructions beside each step's 16 FMAs,
// and spills pointers. On an Intel Xeon this took one thread's 128 x 64 by 64 x 128 product from 178
// to 185 GFLOP/s (g++ 12).
template <CpuCapability isa, int Rows>
GF_CPU_INLINE void block_product_rows_pair(const float* const a[Rows], int64_t a_step, const float* __restrict panel0,
                                           const float* __restrict panel1, int64_t panel_stride, int64_t len,
                                           Floats<isa> acc0[Rows], Floats<isa> acc1[Rows]) {
  Floats<isa> sums0[Rows], sums1[Rows];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) sums0[r] = sums1[r] = Floats<isa>{};
  int64_t t = 0;
  if (a_step == 1) {
    for (; t + 4 <= len; t += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        pair_step<isa, Rows>(a, t + u, panel0 + (t + u) * panel_stride, panel1 + (t + u) * panel_stride, sums0,
                             sums1);
      }
    }
  }
  for (; t < len; ++t) {
    pair_step<isa, Rows>(a, t * a_step, panel0 + t * panel_stride, panel1 + t * panel_stride, sums0, sums1);
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    acc0[r] = sums0[r];
    acc1[r] = sums1[r];
  }
}

// block_product_to over two panels, whose outputs lie kCols apart in each row.
template <CpuCapability isa, int Rows>
GF_CPU_INLINE void block_product_pair_to(const float* const a[Rows], int64_t a_step, const float* __restrict panel0,
                                         const float* __restrict panel1, int64_t panel_stride, int64_t len,
                                         int64_t count, float* out, int64_t out_stride, bool accumulate, float factor) {
  Floats<isa> tile0[Rows], tile1[Rows];
  block_product_rows_pair<isa, Rows>(a, a_step, panel0, panel1, panel_stride, len, tile0, tile1);
  for (int r = 0; r < Rows && r < count; ++r) {
    float* row = out + r * out_stride;
    const Floats<isa> product0 = factor * tile0[r], product1 = factor * tile1[r];
    store16(row, accumulate ? load16<kVectorLanes<isa>>(row) + product0 : product0);
    store16(row + kCols, accumulate ? load16<kVectorLanes<isa>>(row + kCols) + product1 : product1);
  }
}

// MADE's blocks: kRows rows of A at a time, in register tiles of at most kTileRows.
constexpr int kRows = 8;

// acc[r][c] = sum over t < len of a[r][t * a_step] * panel[t * panel_stride + c], t in order, for r <
// kRows, c < kCols.
template <CpuCapability isa>
GF_CPU_INLINE void block_product_for(const float* const a[kRows], int64_t a_step, const float* __restrict panel,
                                     int64_t panel_stride, int64_t len, float acc[kRows][kCols]) {
  constexpr int kTile = kTileRows<isa> >= kRows ? kRows : kTileRows<isa> >= 4 ? 4 : 2;
  for (int r0 = 0; r0 < kRows; r0 += kTile) {
    block_product_to<isa, kTile>(a + r0, a_step, panel, panel_stride, len, kTile, acc[r0], kCols, false, 1.0f);
  }
}
GF_CPU_DISPATCH(block_product)

}  // namespace
}  // namespace genfast
