// The vector loops over the hidden units that NADE's CPU kernels share (one step of one sample).
#pragma once

#include <ATen/Parallel.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "../../kernels/common/nade.h"
#include "cpu_features.h"
#include "ordered_sum.h"

namespace genfast {
namespace {

constexpr int64_t kNadeTile = 8;  // samples sharing one pass over the parameters

typedef float NadeVec16 __attribute__((vector_size(16 * sizeof(float))));

// u . v in a fixed order: four vector accumulators of 16 lanes (locals, so that they stay in
// registers, and four, so that the additions' latency overlaps), then the tail, then the lanes.
GF_CPU_CLONES float dot(const float* __restrict u, const float* __restrict v, float* __restrict products,
                        int64_t n) {
  NadeVec16 s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    NadeVec16 a0, a1, a2, a3, b0, b1, b2, b3;
    __builtin_memcpy(&a0, u + j, sizeof(a0));
    __builtin_memcpy(&a1, u + j + 16, sizeof(a1));
    __builtin_memcpy(&a2, u + j + 32, sizeof(a2));
    __builtin_memcpy(&a3, u + j + 48, sizeof(a3));
    __builtin_memcpy(&b0, v + j, sizeof(b0));
    __builtin_memcpy(&b1, v + j + 16, sizeof(b1));
    __builtin_memcpy(&b2, v + j + 32, sizeof(b2));
    __builtin_memcpy(&b3, v + j + 48, sizeof(b3));
    s0 += a0 * b0;
    s1 += a1 * b1;
    s2 += a2 * b2;
    s3 += a3 * b3;
  }
  const NadeVec16 sum = (s0 + s1) + (s2 + s3);
  __builtin_memcpy(products, &sum, sizeof(sum));
  for (int64_t k = 0; j + k < n; ++k) products[16 + k] = u[j + k] * v[j + k];
  return ordered_sum(products, 16 + (n - j));
}

[[maybe_unused]] GF_CPU_CLONES void add_scaled(float* __restrict dst, const float* __restrict src, float scale, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += scale * src[j];
}

template <NadeActivation kAct>
GF_CPU_CLONES void activate(const float* __restrict a, float* __restrict h, int64_t n) {
  for (int64_t j = 0; j < n; ++j) h[j] = nade_activation(kAct, a[j]);
}

// a += scale * w, then h = act(a), in one pass.
template <NadeActivation kAct>
GF_CPU_CLONES void add_scaled_and_activate(float* __restrict a, float* __restrict h, const float* __restrict w,
                                           float scale, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    a[j] += scale * w[j];
    h[j] = nade_activation(kAct, a[j]);
  }
}

// The forward walk shared by the conditionals and sampling: tiles of kNadeTile rows in parallel,
// each tile walking the D steps with its rows' running pre-activations a (initialised to c) and
// their activations h = act(a), so that a step's rows of V and W are read once for the whole tile.
// h changes only where x[d] != 0, and is recomputed only there: for binary images, most steps are
// a dot product alone. Calls step(row, k, a, h, products), products H + 16 floats of scratch.
template <NadeActivation kAct, typename Step>
void for_each_nade_step(int64_t rows, int64_t dims, int64_t hidden, const float* c, const Step& step) {
  const int64_t tiles = (rows + kNadeTile - 1) / kNadeTile;
  at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<float> state(static_cast<size_t>(2 * kNadeTile * hidden + hidden + 16));
    float* products = state.data() + 2 * kNadeTile * hidden;
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t row0 = tile * kNadeTile, count = std::min(kNadeTile, rows - row0);
      for (int64_t s = 0; s < count; ++s) {
        float* a = state.data() + 2 * s * hidden;
        std::copy(c, c + hidden, a);
        activate<kAct>(a, a + hidden, hidden);
      }
      for (int64_t k = 0; k < dims; ++k) {
        for (int64_t s = 0; s < count; ++s) {
          float* a = state.data() + 2 * s * hidden;
          step(row0 + s, k, a, a + hidden, products);
        }
      }
    }
  });
}

}  // namespace
}  // namespace genfast
