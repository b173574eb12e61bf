// The register-blocked product at the heart of the CPU kernels that multiply matrices (MADE's
// masked layer, attention): a few rows of A against a panel of kCols columns.
#pragma once

#include <stdint.h>

#include "cpu_features.h"

namespace genfast {
namespace {

constexpr int kRows = 8, kCols = 16;  // 8 accumulator vectors of 16 floats: one zmm each with AVX-512

typedef float Vec16 __attribute__((vector_size(kCols * sizeof(float))));

// acc[r] = sum over t < len of a[r][t * a_step] * panel[t * panel_stride + (0 .. kCols)], t in order,
// for r < Rows. The loops over rows unroll completely, so the accumulators stay in registers; a's
// elements are broadcast one at a time, so their stride costs nothing. Inlined into callers
// compiled for several instruction sets (a call from one clone to another goes through the
// dispatcher), whose epilogue then takes acc from registers.
template <int Rows>
GF_CPU_INLINE void block_product_rows(const float* const a[Rows], int64_t a_step, const float* __restrict panel,
                                      int64_t panel_stride, int64_t len, Vec16 acc[Rows]) {
  Vec16 sums[Rows];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) sums[r] = Vec16{};
  for (int64_t t = 0; t < len; ++t) {
    Vec16 p;
    __builtin_memcpy(&p, panel + t * panel_stride, sizeof(p));
    const int64_t i = t * a_step;
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) sums[r] += a[r][i] * p;
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) acc[r] = sums[r];
}

GF_CPU_CLONES void block_product(const float* const a[kRows], int64_t a_step, const float* __restrict panel,
                                 int64_t panel_stride, int64_t len, float acc[kRows][kCols]) {
  Vec16 sums[kRows];
  block_product_rows<kRows>(a, a_step, panel, panel_stride, len, sums);
  for (int r = 0; r < kRows; ++r) __builtin_memcpy(acc[r], &sums[r], sizeof(Vec16));
}

}  // namespace
}  // namespace genfast
