// The Metropolis-adjusted Langevin algorithm's accept/reject, fused in two passes.
//
// A proposal y = x + eps * g_x + sqrt(2 eps) z (g = grad log p = -grad E) is accepted with
// probability min(1, exp(E(x) - E(y) + log q(x | y) - log q(y | x))), where
// log q(b | a) = -||b - a - eps * g_a||^2 / (4 eps). The two squared norms are large and nearly
// equal in high dimension, so pass 1 sums their difference element by element instead:
//   log q(x | y) - log q(y | x) = -1/4 * sum (g_x + g_y) * (2 (y - x) + eps (g_y - g_x)).
// The binding decides per sample; pass 2 copies the accepted proposals (y, g_y) over the current
// state, or (x, g_x) into a separate output.
#pragma once

#include <stdint.h>

#include "host_device.h"

namespace genfast {

template <typename T>
struct MalaSumsParams {
  int64_t rows, row_size, chunk_size, num_chunks;
  const T* x;
  const T* y;
  const T* grad_x;
  const T* grad_y;
  const float* step_size;  // one per row, or one for all (step_size_per_row = false)
  bool step_size_per_row;
  float* partial;  // rows x num_chunks partial sums of mala_ratio_term
};

template <typename T>
struct MalaSelectParams {
  int64_t numel, row_size;
  const bool* accepted;  // one per row
  const T* x;
  const T* y;
  const T* grad_x;
  const T* grad_y;
  T* x_out;     // may be x itself: rejected rows are then left alone
  T* grad_out;  // may be grad_x itself
};

// One element's share of -4 * (log q(x | y) - log q(y | x)).
GF_HOST_DEVICE float mala_ratio_term(float eps, float x, float y, float gx, float gy) {
  return (gx + gy) * (2.0f * (y - x) + eps * (gy - gx));
}

}  // namespace genfast
