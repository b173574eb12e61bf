// The register-blocked product at the heart of the CPU kernels that multiply matrices (MADE's
// masked layer, attention): kRows rows of A against a panel of kCols columns.
#pragma once

#include <stdint.h>

#include "cpu_features.h"

namespace genfast {
namespace {

constexpr int kRows = 8, kCols = 16;  // 8 accumulator vectors of 16 floats: one zmm each with AVX-512

typedef float Vec16 __attribute__((vector_size(kCols * sizeof(float))));

// acc[r][c] = sum over t < len of a[r][t * a_step] * panel[t * panel_stride + c], t in order. The
// accumulators are vector locals so that they stay in registers (an array of them does not); a's
// elements are broadcast one at a time, so their stride costs nothing.
GF_CPU_CLONES void block_product(const float* const a[kRows], int64_t a_step, const float* __restrict panel,
                                 int64_t panel_stride, int64_t len, float acc[kRows][kCols]) {
  Vec16 s0 = {}, s1 = {}, s2 = {}, s3 = {}, s4 = {}, s5 = {}, s6 = {}, s7 = {};
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5], *a6 = a[6], *a7 = a[7];
  for (int64_t t = 0; t < len; ++t) {
    Vec16 p;
    __builtin_memcpy(&p, panel + t * panel_stride, sizeof(p));
    const int64_t i = t * a_step;
    s0 += a0[i] * p;
    s1 += a1[i] * p;
    s2 += a2[i] * p;
    s3 += a3[i] * p;
    s4 += a4[i] * p;
    s5 += a5[i] * p;
    s6 += a6[i] * p;
    s7 += a7[i] * p;
  }
  const Vec16 sums[kRows] = {s0, s1, s2, s3, s4, s5, s6, s7};
  for (int r = 0; r < kRows; ++r) __builtin_memcpy(acc[r], &sums[r], sizeof(Vec16));
}

}  // namespace
}  // namespace genfast
