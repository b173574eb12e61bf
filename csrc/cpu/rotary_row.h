// The rotary turn of one head row on the CPU (kernels/common/rotary.h's formula), shared by
// genfast::rotary and kvcache_append: float32 rows turned in one vectorized loop; float16 and
// bfloat16 rows widened to float32 buffers sixteen elements at a time in vector registers (the
// compiler vectorizes neither c10::Half's nor c10::BFloat16's conversions), turned, and narrowed
// back, rounding to nearest even. Inlined into functions compiled per instruction set
// (cpu_features.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "../../kernels/common/rotary.h"
#include "cpu_features.h"
#include "float16_rows.h"

namespace genfast {
namespace {

// The planes of a float32 head row turned into out (which may be x: each plane is read, then written).
template <bool Interleaved>
GF_CPU_INLINE void turn_planes(const float* x, float* out, const float* cos, const float* sin, int64_t half,
                               bool inverse) {
#pragma omp simd
  for (int64_t m = 0; m < half; ++m) {
    const int64_t a = Interleaved ? 2 * m : m, b = Interleaved ? 2 * m + 1 : m + half;
    float first, second;
    rotary_turn(x[a], x[b], cos[m], rotary_sine(sin[m], inverse), &first, &second);
    out[a] = first;
    out[b] = second;
  }
}

// A head row (head_dim features, contiguous) turned into out (which may be in) by the tables' row
// (cos, sin) of `half` planes; features 2 half .. head_dim copied when copy_rest. buffer holds 4 half
// floats (none for float32).
template <CpuCapability isa, bool Interleaved, typename T>
GF_CPU_INLINE void turn_head_row(const T* in, T* out, const T* cos, const T* sin, int64_t half, int64_t head_dim,
                                 bool inverse, bool copy_rest, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    turn_planes<Interleaved>(in, out, cos, sin, half, inverse);
  } else {
    float* x = buffer;
    float* c = buffer + 2 * half;
    float* s = c + half;
    widen<isa>(in, x, 2 * half);
    widen<isa>(cos, c, half);
    widen<isa>(sin, s, half);
    turn_planes<Interleaved>(x, x, c, s, half, inverse);
    narrow<isa>(x, out, 2 * half);
  }
  if (copy_rest) std::memcpy(out + 2 * half, in + 2 * half, sizeof(T) * (head_dim - 2 * half));
}

}  // namespace
}  // namespace genfast
