// The affine coupling transform of a normalizing flow, per element, and its gradients.
//
// Each sample of x has N elements (all non-batch dims, flattened). index[n] says what element n
// is: -1 for the identity part (y = x), else the position j of its shift t and unconstrained
// scale u in their rows. With log s = f(u):
//
//   forward:  y = x * s + t          (affine order: RealNVP, nflows, FrEIA)
//             y = (x + t) * s        (glow order)
//   inverse:  x = (y - t) / s,  x = y / s - t
//   logdet[b] = +/- sum over the transformed elements of log s
//
// The scale parameterizations, exact to their sources (p is ScaleFn's one parameter):
//   kExp        s = exp(u)
//   kSigmoid    s = sigmoid(u + 2) + p                  nflows (p = 1e-3), Glow (p = 0)
//   kSoftplus   s = softplus(u) + p
//   kTanh       log s = p * tanh(u / p)                 RealNVP / FrEIA soft clamp
//   kAtan       log s = p * 0.636 * atan(u / p)         FrEIA's default soft clamp
//   kSoftBound  log s = u / (1 + |u| / p)               zuko, p = |log(slope)|
#pragma once

#include <stdint.h>

#include "elementary_math.h"
#include "host_device.h"

namespace genfast {

// kSigmoidNoEps is kSigmoid with p = 0 (Glow), where log s = -softplus(-(u + 2)) stays finite after
// sigmoid underflows; the bindings choose it, so that each loop is free of the test of p.
enum class ScaleFn : int32_t {
  kExp = 0, kSigmoid = 1, kSoftplus = 2, kTanh = 3, kAtan = 4, kSoftBound = 5, kSigmoidNoEps = 6
};

struct ScaleTerms {
  float log_scale;  // log s
  float scale;      // s
  float inv_scale;  // 1 / s
  float dlog;       // d log s / du
};

GF_HOST_DEVICE_INLINE ScaleTerms scale_terms(ScaleFn fn, float p, float u) {
  ScaleTerms r;
  switch (fn) {
    case ScaleFn::kSigmoid: {
      const float sg = sigmoid_f32(u + 2.0f);
      r.scale = sg + p;
      r.log_scale = log_f32(r.scale);
      r.inv_scale = 1.0f / r.scale;
      r.dlog = sg * (1.0f - sg) / r.scale;
      return r;
    }
    case ScaleFn::kSigmoidNoEps: {
      const float sg = sigmoid_f32(u + 2.0f);
      r.scale = sg;
      r.log_scale = -softplus_f32(-(u + 2.0f));
      r.inv_scale = 1.0f / sg;
      r.dlog = 1.0f - sg;
      return r;
    }
    case ScaleFn::kSoftplus: {
      r.scale = softplus_f32(u) + p;
      r.log_scale = log_f32(r.scale);
      r.inv_scale = 1.0f / r.scale;
      r.dlog = sigmoid_f32(u) / r.scale;
      return r;
    }
    case ScaleFn::kTanh: {
      const float th = tanh_f32(u / p);
      r.log_scale = p * th;
      r.dlog = 1.0f - th * th;
      break;
    }
    case ScaleFn::kAtan: {
      const float v = u / p;
      r.log_scale = p * 0.636f * atan_f32(v);
      r.dlog = 0.636f / (1.0f + v * v);
      break;
    }
    case ScaleFn::kSoftBound: {
      const float d = 1.0f + abs_f32(u) / p;
      r.log_scale = u / d;
      r.dlog = 1.0f / (d * d);
      break;
    }
    default:  // kExp
      r.log_scale = u;
      r.dlog = 1.0f;
      break;
  }
  r.scale = exp_f32(r.log_scale);
  r.inv_scale = exp_f32(-r.log_scale);
  return r;
}

// The output of one transformed element; its logdet term is +log s (forward) or -log s (inverse).
GF_HOST_DEVICE_INLINE float coupling_value(const ScaleTerms& s, float x, float t, bool glow_order, bool inverse) {
  if (inverse) return glow_order ? x * s.inv_scale - t : (x - t) * s.inv_scale;
  return glow_order ? (x + t) * s.scale : x * s.scale + t;
}

struct CouplingGrads {
  float x, shift, scale;  // to the input, t and u
};

// g: the gradient of the element's output; g_logdet: of its sample's logdet.
GF_HOST_DEVICE_INLINE CouplingGrads coupling_grads(const ScaleTerms& s, float x, float t, float g, float g_logdet,
                                            bool glow_order, bool inverse) {
  CouplingGrads r;
  if (!inverse) {
    r.x = g * s.scale;
    r.shift = glow_order ? g * s.scale : g;
    r.scale = (g * (glow_order ? x + t : x) * s.scale + g_logdet) * s.dlog;
  } else {
    r.x = g * s.inv_scale;
    r.shift = glow_order ? -g : -g * s.inv_scale;
    r.scale = -(g * (glow_order ? x * s.inv_scale : (x - t) * s.inv_scale) + g_logdet) * s.dlog;
  }
  return r;
}

// Which elements are transformed, and where their t and u are.
struct CouplingLayout {
  int64_t rows, row_size;  // B, N
  int64_t transformed;     // elements per row of t and u: N (full layout) or the mask's count
  const int32_t* index;    // N entries
  bool full;               // t and u have x's layout: their gradients are 0 at identity elements
};

template <typename T>
struct AffineCouplingParams {
  CouplingLayout layout;
  ScaleFn fn;
  float scale_param;
  bool glow_order, inverse;
  // Inputs: rows of row_size (x) or transformed (t, u) contiguous elements, rows *_stride apart.
  const T* x;
  const T* shift;
  const T* scale;
  int64_t x_stride, shift_stride, scale_stride;
  T* y;  // contiguous
  // logdet of row r is the sum of partial[r * num_chunks + c]; chunk c covers elements
  // [c * chunk_size, (c + 1) * chunk_size) of the row.
  float* partial;
  int64_t chunk_size, num_chunks;
};

template <typename T>
struct AffineCouplingBackwardParams {
  CouplingLayout layout;
  ScaleFn fn;
  float scale_param;
  bool glow_order, inverse;
  const T* grad_y;
  const float* grad_logdet;  // one per row
  const T* x;
  const T* shift;
  const T* scale;
  int64_t grad_y_stride, x_stride, shift_stride, scale_stride;
  T* grad_x;  // contiguous, like y
  T* grad_shift;
  T* grad_scale;  // contiguous rows of `transformed`
};

}  // namespace genfast
