// The weight of Glow's invertible 1x1 convolution from its LU parameterization:
//
//   W = P L U,  L = strict_lower(lower) + I,  U = strict_upper(upper) + diag(sign * exp(log_diag))
//   log|det W| = sum_k log_diag[k]     (per pixel; a flow layer multiplies it by H * W)
//
// P is a permutation: row i of W is row perm[i] of L U. Entries of lower and upper outside their
// strict triangles are ignored (and get zero gradients).
//
// Backward, with A = L U and dA[perm[i], :] = dW[i, :]:
//   d lower[r, k] = sum_{j >= k} dA[r, j] U[k, j]             for k < r
//   dU[k, j]      = sum_{r >= k} L[r, k] dA[r, j]             for j >= k
//   d upper[k, j] = dU[k, j] (j > k),  d log_diag[k] = dU[k, k] * U[k, k] + d logabsdet
#pragma once

#include <stdint.h>

#include "host_device.h"

namespace genfast {

// The matrices are n x n, row-major and contiguous, float32.
struct LuWeightParams {
  int64_t n;
  const float* lower;
  const float* upper;
  const float* diag;     // n: sign * exp(log_diag), the diagonal of U
  const int64_t* perm;   // n
  float* weight;
};

struct LuWeightBackwardParams {
  int64_t n;
  const float* grad_weight;
  const float* lower;
  const float* upper;
  const float* diag;
  const int64_t* perm;
  float* grad_lower;  // zero outside the strict lower triangle
  float* grad_upper;  // zero outside the strict upper triangle
  float* grad_diag;   // n: dU[k, k]; the binding turns it into d log_diag
};

GF_HOST_DEVICE float lu_lower_entry(const float* lower, int64_t n, int64_t r, int64_t k) {
  return k < r ? lower[r * n + k] : (k == r ? 1.0f : 0.0f);
}

GF_HOST_DEVICE float lu_upper_entry(const float* upper, const float* diag, int64_t n, int64_t k, int64_t j) {
  return j > k ? upper[k * n + j] : (j == k ? diag[k] : 0.0f);
}

// Whether perm names a row of L. The CPU binding checks that perm is a permutation; a GPU does not
// (that would synchronise), and there a row outside gives NaN instead of a read past L.
GF_HOST_DEVICE_INLINE bool lu_row_in_range(int64_t r, int64_t n) { return r >= 0 && r < n; }

// W[i, j]: row perm[i] of L times column j of U.
GF_HOST_DEVICE float lu_weight_entry(const LuWeightParams& p, int64_t i, int64_t j) {
  const int64_t r = p.perm[i];
  if (!lu_row_in_range(r, p.n)) return __builtin_nanf("");
  const int64_t last = r < j ? r : j;
  float sum = 0.0f;
  for (int64_t k = 0; k <= last; ++k) {
    sum += lu_lower_entry(p.lower, p.n, r, k) * lu_upper_entry(p.upper, p.diag, p.n, k, j);
  }
  return sum;
}

// d lower[perm[i], k] for k < perm[i]: row i of dW times row k of U.
GF_HOST_DEVICE float lu_grad_lower_entry(const LuWeightBackwardParams& p, int64_t i, int64_t k) {
  float sum = 0.0f;
  for (int64_t j = k; j < p.n; ++j) sum += p.grad_weight[i * p.n + j] * lu_upper_entry(p.upper, p.diag, p.n, k, j);
  return sum;
}

// dU[k, j] for j >= k: column k of L times column j of dA, as a sum over the rows i of dW.
GF_HOST_DEVICE float lu_grad_upper_entry(const LuWeightBackwardParams& p, int64_t k, int64_t j) {
  float sum = 0.0f;
  for (int64_t i = 0; i < p.n; ++i) {
    const int64_t r = p.perm[i];
    if (!lu_row_in_range(r, p.n)) return __builtin_nanf("");
    if (r >= k) sum += lu_lower_entry(p.lower, p.n, r, k) * p.grad_weight[i * p.n + j];
  }
  return sum;
}

}  // namespace genfast
