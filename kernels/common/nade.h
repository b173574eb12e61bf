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
#include "philox.h"

namespace genfast {

// The CUDA kernels hold a sample's hidden units in one warp's registers: 32 per lane for the
// running pre-activations, 32 more for the backward's running gradient.
constexpr int64_t kNadeCudaMaxHidden = 1024;

enum class NadeActivation : int32_t { kSigmoid = 0, kRelu = 1 };

// The hidden units' sigmoid, the kernels' hottest function (B x D x H evaluations at most): from
// e = exp(-|a|) in (0, 1], never overflowing, 1 / (1 + e) or e / (1 + e); within 4 ulp. Results
// below 2^-126 (a < -87.3) flush to 0, an absolute error under 1.2e-38.
GF_HOST_DEVICE_INLINE float nade_sigmoid(float a) {
#if defined(__CUDA_ARCH__)
  return sigmoid_f32(a);
#else
  const float e = exp_nonpositive(-__builtin_fabsf(a));
  const float inverse = 1.0f / (1.0f + e);
  const float s = a >= 0.0f ? inverse : e * inverse;
  return a != a ? a : s;
#endif
}

GF_HOST_DEVICE_INLINE float nade_activation(NadeActivation act, float a) {
  return act == NadeActivation::kRelu ? (a > 0.0f ? a : (a != a ? a : 0.0f)) : nade_sigmoid(a);
}

// d act / da, from a and h = act(a).
GF_HOST_DEVICE_INLINE float nade_activation_grad(NadeActivation act, float a, float h) {
  return act == NadeActivation::kRelu ? (a > 0.0f ? 1.0f : 0.0f) : h * (1.0f - h);
}

// The dimension that step k of `row` visits: ordering null (natural order), (D) shared, or (B, D).
GF_HOST_DEVICE_INLINE int64_t nade_step_dim(const int64_t* ordering, bool per_row, int64_t row, int64_t dims,
                                            int64_t k) {
  return ordering == nullptr ? k : ordering[(per_row ? row * dims : 0) + k];
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

// The backward, recomputing the running pre-activations from the last one backwards
// (a_k = a_{k+1} - W[:, o_k] x[o_k]) instead of storing them. With A the gradient reaching a_{k+1}:
//   db[o_k] += g_k;  dV[o_k] += g_k h_k;  dW[:, o_k] += A x[o_k];  dx[o_k] = W[:, o_k] . A;
//   A += (g_k V[o_k]) * act'(a_k);  and dc = A after the first step.
// Once every nonzero x has been subtracted again, a is reset to c: the steps before the first
// nonzero x then see exactly the forward's a_k = c (ReLU's derivative at a = 0 depends on it).
// Samples are split into num_chunks chunks of rows_per_chunk, each with its own partial sums of
// dW (transposed, (D, H)), dV, db and dc, added in order afterwards (deterministic).
template <typename T>
struct NadeBackwardParams {
  NadeConditionalsParams<T> forward;  // logits unused
  const T* grad_logits;               // (B, D), contiguous
  int64_t rows_per_chunk, num_chunks;
  float* grad_w_t;  // (num_chunks, D, H)
  float* grad_v;    // (num_chunks, D, H)
  float* grad_b;    // (num_chunks, D)
  float* grad_c;    // (num_chunks, H)
  float* grad_x;    // (B, D)
};

// Sampling: step k visits d = o_k and sets x[d] = 1 where u[d] < sigmoid(logit[d]), else 0 (NaN
// where the logit is NaN, which then reaches every later step); the
// first num_observed steps copy x[d] from `observed` instead (conditional completion). u is read
// from `uniforms` (float32, (B, D)) or, when null, drawn in-kernel: element (row, d) is the Philox
// uniform of index row * D + d of the call's key (genfast.reference.random.philox_uniform).
template <typename T>
struct NadeSampleParams {
  int64_t rows, dims, hidden;
  const float* w_t;  // (D, H)
  const float* c;    // (H)
  const float* v;    // (D, H)
  const float* b;    // (D)
  const int64_t* ordering;
  bool ordering_per_row;
  NadeActivation activation;
  const float* uniforms;  // (B, D) or null
  PhiloxKeyRef key;
  const float* observed;  // (B, D) or null
  int64_t num_observed;
  T* x;  // (B, D), contiguous
};

GF_HOST_DEVICE_INLINE float nade_draw(float logit, float u) {
  return logit != logit ? logit : (u < sigmoid_f32(logit) ? 1.0f : 0.0f);
}

}  // namespace genfast
