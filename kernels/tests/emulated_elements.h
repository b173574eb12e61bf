// The element types of the emulated CUDA kernels' host tests: float, __half and __nv_bfloat16 to and
// from float, and each one's tolerance against a float64 evaluation.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
T from(float v);
template <>
inline float from<float>(float v) { return v; }
template <>
inline __half from<__half>(float v) { return __float2half_rn(v); }
template <>
inline __nv_bfloat16 from<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
double tolerance() {
  return sizeof(T) == 4 ? 1e-6 : (std::is_same<T, __half>::value ? 1e-3 : 8e-3);
}

// Whether got is within T's tolerance of expected (relative, absolute below 1); NaN is not. The
// error goes into *worst.
template <typename T>
bool close_enough(double got, double expected, double* worst) {
  const double error = std::fabs(got - expected) / std::max(1.0, std::fabs(expected));
  *worst = std::max(*worst, error);
  return error <= tolerance<T>();
}

template <typename T>
const char* element_name() {
  return sizeof(T) == 4 ? "float32" : (std::is_same<T, __half>::value ? "float16" : "bfloat16");
}
