// Binary NADE's conditionals (genfast/reference/nade.py): for each sample, visiting the
// dimensions in an ordering o,
//
//   a = c;  for k: h = act(a); logit[o_k] = b[o_k] + V[o_k] . h; a += W[:, o_k] * x[o_k]
//
// with O(H) working memory per sample: the running pre-activation a, never the (D, H) of all steps.
#pragma once

#include <stdint.h>

#include "elementary_math.h"
#include "host_device.h"

namespace genfast {

enum class NadeActivation : int32_t { kSigmoid = 0, kRelu = 1 };

GF_HOST_DEVICE_INLINE float nade_activation(NadeActivation act, float a) {
  return act == NadeActivation::kRelu ? (a > 0.0f ? a : (a != a ? a : 0.0f)) : sigmoid_f32(a);
}

// Parameters in float32: W transposed to (D, H) so that a step reads one contiguous row.
template <typename T>
struct NadeConditionalsParams {
  int64_t rows, dims, hidden;  // B, D, H
  const T* x;                  // (B, D), contiguous
  const float* w_t;            // (D, H)
  const float* c;              // (H)
  const float* v;              // (D, H)
  const float* b;              // (D)
  const int64_t* ordering;     // null (natural order), (D) shared, or (B, D)
  bool ordering_per_row;
  NadeActivation activation;
  T* logits;  // (B, D), contiguous
};

}  // namespace genfast
