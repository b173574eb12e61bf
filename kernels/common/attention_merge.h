// Merging partial attentions (genfast.reference.attention_merge): attentions of one query row over
// disjoint sets of keys, each given as its normalized output o_s and log-sum-exp lse_s to base b,
// make the attention over all the keys:
//   lse = log_b sum_s b^lse_s,   o = sum_s a_s o_s,   a_s = b^(lse_s - lse).
// The kernels take ln_base = ln b: 1 for natural lse (genfast's, FlashAttention's), ln 2 for base-2
// lse (FlashInfer's); b^x is computed as e^(x ln_base), exact for ln_base 1.
// A row whose states all have lse -inf (no keys anywhere) gets o = 0 and lse = -inf; a NaN lse makes
// the row NaN. The backward, for incoming gradients g (of o) and g_lse (of lse), with d_s = g . o_s:
//   grad o_s = a_s g,   grad lse_s = a_s (ln_base (d_s - sum_t a_t d_t) + g_lse).
#pragma once

#include <stdint.h>

#include <type_traits>

#include "elementary_math.h"
#include "host_device.h"

namespace genfast {

// Where each state's rows are, in elements from state 0's: the first kListed states each at its own
// offset (states from separate tensors), later ones `stride` apart (states stacked in one tensor).
struct AttentionMergeStates {
  static constexpr int kListed = 8;
  int64_t listed[kListed];
  int64_t stride;
};

// Selects, not an index into the array, which nvcc would copy from the kernel's parameters to local memory.
GF_HOST_DEVICE_INLINE int64_t attention_merge_state_at(const AttentionMergeStates& states, int64_t s) {
  int64_t at = s * states.stride;
#pragma unroll
  for (int k = 0; k < AttentionMergeStates::kListed; ++k) at = s == k ? states.listed[k] : at;
  return at;
}

// Rows are (outer, inner) pairs, each addressed by its own stride, so that both (batch, heads,
// queries) outputs and (tokens, heads) packed ones are read in place.
template <typename T>
struct AttentionMergeParams {
  int64_t states, rows_outer, rows_inner, head_dim;
  const T* o;  // state 0's (rows_outer, rows_inner, head_dim), features contiguous
  int64_t o_strides[2];
  AttentionMergeStates o_states;
  const float* lse;  // state 0's (rows_outer, rows_inner)
  int64_t lse_strides[2];
  AttentionMergeStates lse_states;
  float ln_base;   // of lse's base
  T* out;          // (rows_outer, rows_inner, head_dim), features contiguous
  int64_t out_strides[2];
  float* out_lse;  // (rows_outer, rows_inner)
  int64_t out_lse_strides[2];
};

template <typename T>
struct AttentionMergeBackwardParams {
  int64_t states, rows_outer, rows_inner, head_dim;
  const T* grad_out;        // (rows, head_dim), contiguous
  const float* grad_lse;    // (rows), or null: no gradient of the merged lse
  const T* o;               // as AttentionMergeParams
  int64_t o_strides[2];
  AttentionMergeStates o_states;
  const float* lse;
  int64_t lse_strides[2];
  AttentionMergeStates lse_states;
  float ln_base;
  T* grad_o;                // (states, rows, head_dim), contiguous
  float* grad_lse_states;   // (states, rows)
};

// The offset of row r (= outer * rows_inner + inner) of a state or an output. An output may be one
// of the states (a merge in place): the kernels read all of a row's inputs before writing its outputs.
GF_HOST_DEVICE_INLINE int64_t attention_merge_row_offset(const int64_t (&strides)[2], int64_t rows_inner, int64_t r) {
  return (r / rows_inner) * strides[0] + (r % rows_inner) * strides[1];
}

// The larger of a and b, NaN if either is.
GF_HOST_DEVICE_INLINE float attention_merge_max(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return b > a ? b : a;
}

// b^x for lse's base b = e^ln_base.
GF_HOST_DEVICE_INLINE float attention_merge_pow(float x, float ln_base) { return exp_f32(x * ln_base); }

// log_b total, total > 0.
GF_HOST_DEVICE_INLINE float attention_merge_log(float total, float ln_base) { return log_f32(total) / ln_base; }

// The merged lse of one row, whose states' lse are lse[attention_merge_state_at(at, s)].
GF_HOST_DEVICE_INLINE float attention_merged_lse(const float* lse, const AttentionMergeStates& at, int64_t states,
                                                 float ln_base) {
  float most = -__builtin_inff();
  for (int64_t s = 0; s < states; ++s) most = attention_merge_max(most, lse[attention_merge_state_at(at, s)]);
  if (most == -__builtin_inff()) return most;
  float total = 0.0f;
  for (int64_t s = 0; s < states; ++s) total += attention_merge_pow(lse[attention_merge_state_at(at, s)] - most, ln_base);
  return most + attention_merge_log(total, ln_base);
}

// Row r of a merge or of its backward (Params): state 0's o and lse there, and the merged lse.
template <typename T>
struct AttentionMergeRow {
  const T* o;
  const float* lse;
  float merged;
};

template <typename Params>
GF_HOST_DEVICE_INLINE auto attention_merge_row(const Params& p, int64_t r) {
  using T = std::remove_const_t<std::remove_pointer_t<decltype(p.o)>>;
  const float* lse = p.lse + attention_merge_row_offset(p.lse_strides, p.rows_inner, r);
  return AttentionMergeRow<T>{p.o + attention_merge_row_offset(p.o_strides, p.rows_inner, r), lse,
                              attention_merged_lse(lse, p.lse_states, p.states, p.ln_base)};
}

// a_s: the weight of a state of log-sum-exp lse_s in a row whose merged lse is `merged` (0 when
// the row has no keys).
GF_HOST_DEVICE_INLINE float attention_merge_weight(float lse_s, float merged, float ln_base) {
  return merged == -__builtin_inff() ? 0.0f : attention_merge_pow(lse_s - merged, ln_base);
}

// a_s again, from the row's shares b^(lse_s - m) and their sum `total` (m: the row's largest lse),
// for a kernel that has both: a division in place of a power, and no rounding of lse_s - lse.
GF_HOST_DEVICE_INLINE float attention_merge_share_weight(float share, float total) { return share / total; }

// grad lse_s = a_s (ln_base (d_s - sum_t a_t d_t) + g_lse), for dot = d_s and mean = sum_t a_t d_t.
GF_HOST_DEVICE_INLINE float attention_merge_lse_grad(float weight, float dot, float mean, float grad_lse,
                                                     float ln_base) {
  return weight * (ln_base * (dot - mean) + grad_lse);
}

}  // namespace genfast
