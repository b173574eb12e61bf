// Rotary position embedding (RoPE, genfast.reference.rotary): the turn of a head row's planes by
// the angles of a position's row of cos and sin tables, and genfast::rotary's parameters. Plane m <
// half is features (2m, 2m + 1) (interleaved, GPT-J) or (m, m + half) (GPT-NeoX); features from
// 2 half on pass unchanged. The inverse negates sin: the transpose of the map for any tables (so the
// backward of rotary is rotary inverse), and for a rotation's tables the turn back.
#pragma once

#include <stdint.h>

#include "host_device.h"

namespace genfast {

// The features that plane m turns.
GF_HOST_DEVICE_INLINE void rotary_plane(int64_t m, int64_t half, bool interleaved, int64_t* first, int64_t* second) {
  *first = interleaved ? 2 * m : m;
  *second = interleaved ? 2 * m + 1 : m + half;
}

// (x1, x2) turned by the angle of (c, s), as the reference computes it.
GF_HOST_DEVICE_INLINE void rotary_turn(float x1, float x2, float c, float s, float* y1, float* y2) {
  *y1 = x1 * c - x2 * s;
  *y2 = x1 * s + x2 * c;
}

// Feature j's share of a turn, for kernels that compute one output feature per thread (CUDA): its
// plane, its partner feature in that plane, and the turned value from both features' inputs. j must
// be below 2 half (later features pass unchanged).
GF_HOST_DEVICE int64_t rotary_plane_of(int64_t j, int64_t half, bool interleaved) {
  return interleaved ? j / 2 : (j < half ? j : j - half);
}

GF_HOST_DEVICE int64_t rotary_partner(int64_t j, int64_t half, bool interleaved) {
  return interleaved ? (j ^ 1) : (j < half ? j + half : j - half);
}

GF_HOST_DEVICE float rotary_feature(int64_t j, int64_t half, bool interleaved, float x, float partner, float c,
                                    float s) {
  const bool first = interleaved ? (j % 2 == 0) : j < half;
  float y1, y2;
  if (first) {
    rotary_turn(x, partner, c, s, &y1, &y2);
    return y1;
  }
  rotary_turn(partner, x, c, s, &y1, &y2);
  return y2;
}

// The sine of the turn: negated for the inverse (the transpose).
GF_HOST_DEVICE_INLINE float rotary_sine(float s, bool inverse) { return inverse ? -s : s; }

// x (batch, seqlen, heads, head_dim) turned into out (the same shape; out may be x): token (b, i)
// at position positions[b, i] (strides may be 0), whose angles are row `position` of cos and sin.
template <typename T>
struct RotaryParams {
  int64_t batch, seqlen, heads, head_dim;
  const T* x;  // features contiguous; batch, token and head strides below
  int64_t x_strides[3];
  T* out;
  int64_t out_strides[3];
  const T* cos;  // (table_rows, half), features contiguous, rows table_stride apart
  const T* sin;
  int64_t table_rows, table_stride, half;
  const int32_t* positions;
  int64_t position_strides[2];
  bool interleaved, inverse;
  bool copy_rest;  // features 2 half .. head_dim copied (false when out is x)
};

template <typename T>
GF_HOST_DEVICE_INLINE int64_t rotary_position(const RotaryParams<T>& p, int64_t b, int64_t i) {
  return static_cast<int64_t>(p.positions[b * p.position_strides[0] + i * p.position_strides[1]]);
}

// Whether a position has a row of the tables. The CPU binding checks every position first; a GPU
// does not (that would synchronise), and its kernels turn a position outside by nothing (cos 1,
// sin 0), as FlashAttention's do, instead of reading past the tables.
template <typename T>
GF_HOST_DEVICE_INLINE bool rotary_in_table(const RotaryParams<T>& p, int64_t position) {
  return position >= 0 && position < p.table_rows;
}

}  // namespace genfast
