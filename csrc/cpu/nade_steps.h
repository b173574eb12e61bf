// The vector loops over the hidden units that NADE's CPU kernels share (one step of one sample).
#pragma once

#include <ATen/Parallel.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "../../kernels/common/nade.h"
#include "cpu_features.h"
#include "cpu_vectors.h"
#include "ordered_sum.h"

namespace genfast {
namespace {

constexpr int64_t kNadeTile = 8;  // samples sharing one pass over the parameters

// u . v in a fixed order: four accumulators of 16 lanes (locals, so that they stay in registers,
// and four, so that the additions' latency overlaps), then the tail, then the lanes.
template <CpuCapability isa>
GF_CPU_INLINE float dot_for(const float* __restrict u, const float* __restrict v, float* __restrict products,
                            int64_t n) {
  constexpr int W = kVectorLanes<isa>;
  Floats<isa> s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    s0 += load16<W>(u + j) * load16<W>(v + j);
    s1 += load16<W>(u + j + 16) * load16<W>(v + j + 16);
    s2 += load16<W>(u + j + 32) * load16<W>(v + j + 32);
    s3 += load16<W>(u + j + 48) * load16<W>(v + j + 48);
  }
  store16(products, (s0 + s1) + (s2 + s3));
  for (int64_t k = 0; j + k < n; ++k) products[16 + k] = u[j + k] * v[j + k];
  return ordered_sum(products, 16 + (n - j));
}
GF_CPU_DISPATCH(dot)

template <CpuCapability isa>
GF_CPU_INLINE void add_scaled_for(float* __restrict dst, const float* __restrict src, float scale, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += scale * src[j];
}
GF_CPU_DISPATCH(add_scaled)

template <CpuCapability isa, NadeActivation kAct>
GF_CPU_INLINE void activate_for(const float* __restrict a, float* __restrict h, int64_t n) {
  for (int64_t j = 0; j < n; ++j) h[j] = nade_activation(kAct, a[j]);
}
GF_CPU_DISPATCH(activate)

// a += scale * w, then h = act(a), in one pass.
template <CpuCapability isa, NadeActivation kAct>
GF_CPU_INLINE void add_scaled_and_activate_for(float* __restrict a, float* __restrict h, const float* __restrict w,
                                               float scale, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    a[j] += scale * w[j];
    h[j] = nade_activation(kAct, a[j]);
  }
}
GF_CPU_DISPATCH(add_scaled_and_activate)

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
