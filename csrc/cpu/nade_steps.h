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

// h = act(a); returns V_row . h (summed in a fixed order).
template <NadeActivation kAct>
GF_CPU_CLONES float activate_and_dot(const float* __restrict a, const float* __restrict v_row,
                                     float* __restrict products, int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) products[j] = v_row[j] * nade_activation(kAct, a[j]);
  return ordered_sum(products, hidden);
}

GF_CPU_CLONES void add_scaled(float* __restrict dst, const float* __restrict src, float scale, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += scale * src[j];
}

// The forward walk shared by the conditionals and sampling: tiles of kNadeTile rows in parallel,
// each tile walking the D steps with its rows' running pre-activations (initialised to c), so that
// a step's rows of V and W are read once for the whole tile. Calls step(row, k, a, products), with
// a the row's H running pre-activations and products H floats of scratch.
template <typename Step>
void for_each_nade_step(int64_t rows, int64_t dims, int64_t hidden, const float* c, const Step& step) {
  const int64_t tiles = (rows + kNadeTile - 1) / kNadeTile;
  at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<float> state(static_cast<size_t>((kNadeTile + 1) * hidden));
    float* products = state.data() + kNadeTile * hidden;
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t row0 = tile * kNadeTile, count = std::min(kNadeTile, rows - row0);
      for (int64_t s = 0; s < count; ++s) std::copy(c, c + hidden, state.data() + s * hidden);
      for (int64_t k = 0; k < dims; ++k) {
        for (int64_t s = 0; s < count; ++s) step(row0 + s, k, state.data() + s * hidden, products);
      }
    }
  });
}

}  // namespace
}  // namespace genfast
