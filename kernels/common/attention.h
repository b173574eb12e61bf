// Scaled-dot-product attention (genfast/reference/attention.py): per batch b and query head h,
// with kv head h / (heads / kv_heads),
//   s_ij = scale q_i . k_j;  s = softcap tanh(s / softcap);  s -= slope_h |i + Lk - Lq - j|;
//   s += bias_ij or s = -inf where a bool mask is false;  s = -inf unless i + band_lo <= j <= i + band_hi;
//   o_i = sum_j dropout(softmax(s_i))_j v_j;  lse_i = logsumexp_j s_ij
// A row masking every key gives o = 0 and lse = -inf. Dropout keeps element
// ((b heads + h) Lq + i) Lk + j where its Philox uniform is >= dropout_p, scaled by 1/(1 - p).
#pragma once

#include <stdint.h>

#include "elementary_math.h"
#include "host_device.h"
#include "philox.h"

namespace genfast {

enum class AttentionMask : int32_t { kNone = 0, kBool = 1, kAdditive = 2 };

constexpr int64_t kAttentionUnbounded = int64_t(1) << 62;  // band_lo = -this or band_hi = this: no bound

// Inputs float32 with the head dimension contiguous; strides in elements for (b, h, position).
struct AttentionParams {
  int64_t batch, heads, kv_heads, q_len, k_len, dim, v_dim;
  const float* q;
  int64_t q_stride[3];
  const float* k;
  int64_t k_stride[3];
  const float* v;
  int64_t v_stride[3];
  AttentionMask mask_kind;
  const void* mask;        // uint8 (bool) or float32, read at b, h, i, j with mask_stride (0: broadcast)
  int64_t mask_stride[4];
  const float* alibi_slopes;  // (heads) or (batch, heads), or null
  int64_t alibi_batch_stride;
  float scale, softcap;  // softcap 0: none
  int64_t band_lo, band_hi;
  float dropout_p;
  PhiloxKeyRef key;
  float* o;    // (batch, heads, q_len, v_dim), contiguous
  float* lse;  // (batch, heads, q_len)
};

// s_ij after soft-capping, ALiBi, the mask and the band, from the scaled dot product.
GF_HOST_DEVICE_INLINE float attention_score(const AttentionParams& p, float scaled_dot, int64_t b, int64_t h, int64_t i,
                                            int64_t j) {
  float s = p.softcap > 0.0f ? p.softcap * tanh_f32(scaled_dot / p.softcap) : scaled_dot;
  if (p.alibi_slopes != nullptr) {
    const float slope = p.alibi_slopes[b * p.alibi_batch_stride + h];
    const int64_t distance = i + (p.k_len - p.q_len) - j;
    s -= slope * static_cast<float>(distance < 0 ? -distance : distance);
  }
  if (p.mask_kind != AttentionMask::kNone) {
    const int64_t at = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3];
    if (p.mask_kind == AttentionMask::kBool) {
      if (static_cast<const uint8_t*>(p.mask)[at] == 0) s = -__builtin_inff();
    } else {
      s += static_cast<const float*>(p.mask)[at];
    }
  }
  if (j < i + p.band_lo || j > i + p.band_hi) s = -__builtin_inff();
  return s;
}

// Whether dropout keeps element (b, h, i, j), from the call's resolved key.
GF_HOST_DEVICE_INLINE bool attention_keeps(const AttentionParams& p, uint64_t seed, uint64_t offset, int64_t b,
                                           int64_t h, int64_t i, int64_t j) {
  const uint64_t index = static_cast<uint64_t>(((b * p.heads + h) * p.q_len + i) * p.k_len + j);
  return philox_uniform(seed, offset, index) >= p.dropout_p;
}

}  // namespace genfast
