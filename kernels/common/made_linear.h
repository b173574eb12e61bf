// MADE's masked linear layer (Germain et al. 2015), y = x (W * M)^T + bias, with the connectivity
// mask M computed from the units' degrees instead of read or materialized:
//   M[k, j] = deg_out[k] >= deg_in[j]   (hidden layers)   or   deg_out[k] > deg_in[j]   (strict: output layer)
// Masked-out weights take no part whatever their value (genfast/reference/nade.py, made_linear).
#pragma once

#include <stdint.h>

#include "host_device.h"

namespace genfast {

GF_HOST_DEVICE_INLINE bool made_connected(int32_t out_degree, int32_t in_degree, bool strict) {
  return strict ? out_degree > in_degree : out_degree >= in_degree;
}

// Inputs in float32, contiguous; y in the input dtype T.
template <typename T>
struct MadeLinearParams {
  int64_t rows, in_features, out_features;
  const float* x;            // (rows, in)
  const float* weight;       // (out, in)
  const float* bias;         // (out) or null
  const int32_t* in_degrees;   // (in)
  const int32_t* out_degrees;  // (out)
  bool strict;
  T* y;  // (rows, out)
};

// grad_x = grad_y (W * M);  grad_weight = (grad_y^T x) * M;  grad_bias = column sums of grad_y.
// All float32, written (not accumulated), each sum in a fixed order.
struct MadeLinearBackwardParams {
  MadeLinearParams<float> forward;  // y unused
  const float* grad_y;              // (rows, out)
  float* grad_x;                    // (rows, in)
  float* grad_weight;               // (out, in)
  float* grad_bias;                 // (out)
};

}  // namespace genfast
