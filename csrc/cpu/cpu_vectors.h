// Sixteen floats held as the vector registers of one instruction set: one of 16 lanes with
// AVX-512, two of 8 with AVX2, four of 4 otherwise (SSE, NEON). g++ keeps a 16-lane vector type
// that has no register of its width in memory and moves it through general registers (products 10x
// slower with AVX2), so no vector here is wider than the machine's. Every operation is lane by
// lane, and the reduction and transposes below take the same steps at every width, so that results
// differ between instruction sets only where one fuses a multiply and an add that another rounds
// twice (the default capability has no FMA).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <utility>

#include "cpu_features.h"

namespace genfast {
namespace {

constexpr int kCols = 16;

template <CpuCapability isa>
constexpr int kVectorLanes = isa == CpuCapability::kAvx512 ? 16 : isa == CpuCapability::kAvx2 ? 8 : 4;

template <int W>
struct Floats16 {
  typedef float Part __attribute__((vector_size(W * sizeof(float))));
  static constexpr int kParts = kCols / W;
  Part part[kParts];  // lanes k * W .. k * W + W - 1 in part[k]
};

template <CpuCapability isa>
using Floats = Floats16<kVectorLanes<isa>>;

#define GF_LANES_LOOP _Pragma("GCC unroll 4") for (int k = 0; k < Floats16<W>::kParts; ++k)

// Register by register (one copy of the whole struct goes through the stack in pieces narrower
// than the registers, which stalls the loads that follow).
template <int W>
GF_CPU_INLINE Floats16<W> load16(const float* src) {
  Floats16<W> v;
  GF_LANES_LOOP __builtin_memcpy(&v.part[k], src + k * W, sizeof(v.part[k]));
  return v;
}

// Sixteen bfloat16 or IEEE float16 numbers (their bits) widened to float32 exactly, lane by lane:
// bfloat16 is float32's upper half; float16 goes through float32 arithmetic that rebiases its
// exponent (normal numbers, infinities, NaN) or scales its subnormals, as the fp16 library's
// fp16_ieee_to_fp32_value does (without F16C, which the default capability lacks).
template <int W>
struct Bits16 {  // W lanes of 16-bit numbers, and the same lanes widened to 32 bits
  typedef uint16_t Halves __attribute__((vector_size(W * sizeof(uint16_t))));
  typedef uint32_t Words __attribute__((vector_size(W * sizeof(uint32_t))));
};

// W 16-bit numbers as the upper halves of W 32-bit words (written to out: a vector returned by value
// from a function compiled for the baseline would change the ABI).
template <int W>
GF_CPU_INLINE void load_widened(const uint16_t* src, typename Bits16<W>::Words& out) {
  typename Bits16<W>::Halves h;
  __builtin_memcpy(&h, src, sizeof(h));
  out = __builtin_convertvector(h, typename Bits16<W>::Words) << 16;
}

template <int W>
GF_CPU_INLINE Floats16<W> load16_bfloat16(const uint16_t* src) {
  Floats16<W> v;
  for (int k = 0; k < Floats16<W>::kParts; ++k) {
    typename Bits16<W>::Words w;
    load_widened<W>(src + k * W, w);
    __builtin_memcpy(&v.part[k], &w, sizeof(w));
  }
  return v;
}

template <int W>
GF_CPU_INLINE Floats16<W> load16_float16(const uint16_t* src) {
  typedef typename Bits16<W>::Words Words;
  typedef typename Floats16<W>::Part Part;
  Floats16<W> v;
  for (int k = 0; k < Floats16<W>::kParts; ++k) {
    Words w;
    load_widened<W>(src + k * W, w);
    const Words sign = w & 0x80000000u, twice = w + w;
    const Words normal_bits = (twice >> 4) + (0xE0u << 23);  // the exponent rebiased, 2^112 too high
    const Words subnormal_bits = (twice >> 17) | (126u << 23);  // 0.5 + mantissa * 2^-24
    Part normal, subnormal;
    __builtin_memcpy(&normal, &normal_bits, sizeof(normal));
    __builtin_memcpy(&subnormal, &subnormal_bits, sizeof(subnormal));
    normal *= 0x1.0p-112f;
    subnormal -= 0.5f;
    Words normal_out, subnormal_out;
    __builtin_memcpy(&normal_out, &normal, sizeof(normal));
    __builtin_memcpy(&subnormal_out, &subnormal, sizeof(subnormal));
    const Words out = sign | (twice < (1u << 27) ? subnormal_out : normal_out);
    __builtin_memcpy(&v.part[k], &out, sizeof(out));
  }
  return v;
}

template <int W>
GF_CPU_INLINE void store16(float* dst, const Floats16<W>& v) {
  GF_LANES_LOOP __builtin_memcpy(dst + k * W, &v.part[k], sizeof(v.part[k]));
}

// Sixteen floats narrowed to bfloat16 or IEEE float16 bits, rounded to nearest even, lane by lane
// (what c10's BFloat16 and Half constructors compute, vectorized): bfloat16 keeps float32's upper
// half, NaN as the quiet 0x7FC0; float16 rounds by adding a power of two that leaves the kept bits
// in the mantissa's low end (the fp16 library's fp16_ieee_from_fp32_value), overflow to infinity,
// subnormals and NaN (0x7E00) included.
template <int W>
GF_CPU_INLINE void store16_bfloat16(uint16_t* dst, const Floats16<W>& v) {
  typedef typename Bits16<W>::Words Words;
  for (int k = 0; k < Floats16<W>::kParts; ++k) {
    Words w;
    __builtin_memcpy(&w, &v.part[k], sizeof(w));
    const Words nan = (Words)(v.part[k] != v.part[k]);  // all ones where NaN
    const Words rounded = (w + (0x7FFFu + ((w >> 16) & 1u))) >> 16;
    const typename Bits16<W>::Halves h =
        __builtin_convertvector((nan & 0x7FC0u) | (~nan & rounded), typename Bits16<W>::Halves);
    __builtin_memcpy(dst + k * W, &h, sizeof(h));
  }
}

template <int W>
GF_CPU_INLINE void store16_float16(uint16_t* dst, const Floats16<W>& v) {
  typedef typename Bits16<W>::Words Words;
  typedef typename Floats16<W>::Part Part;
  for (int k = 0; k < Floats16<W>::kParts; ++k) {
    Words w, magnitude_bits;
    __builtin_memcpy(&w, &v.part[k], sizeof(w));
    magnitude_bits = w & 0x7FFFFFFFu;
    Part magnitude;
    __builtin_memcpy(&magnitude, &magnitude_bits, sizeof(magnitude));
    Part base = (magnitude * 0x1.0p+112f) * 0x1.0p-110f;  // overflows to infinity past float16's range
    const Words twice = w + w, sign = w & 0x80000000u;
    Words bias = twice & 0xFF000000u;
    bias = bias < 0x71000000u ? Words{} + 0x71000000u : bias;
    const Words rounder_bits = (bias >> 1) + 0x07800000u;
    Part rounder;
    __builtin_memcpy(&rounder, &rounder_bits, sizeof(rounder));
    base = rounder + base;
    Words bits;
    __builtin_memcpy(&bits, &base, sizeof(bits));
    const Words finite = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    const Words out = (sign >> 16) | (twice > 0xFF000000u ? Words{} + 0x7E00u : finite);
    const typename Bits16<W>::Halves h = __builtin_convertvector(out, typename Bits16<W>::Halves);
    __builtin_memcpy(dst + k * W, &h, sizeof(h));
  }
}

template <int W>
GF_CPU_INLINE Floats16<W> splat16(float x) {
  Floats16<W> v;
  GF_LANES_LOOP v.part[k] = x - typename Floats16<W>::Part{};
  return v;
}

template <int W>
GF_CPU_INLINE Floats16<W> operator+(Floats16<W> a, const Floats16<W>& b) {
  GF_LANES_LOOP a.part[k] += b.part[k];
  return a;
}
template <int W>
GF_CPU_INLINE Floats16<W>& operator+=(Floats16<W>& a, const Floats16<W>& b) {
  GF_LANES_LOOP a.part[k] += b.part[k];
  return a;
}
template <int W>
GF_CPU_INLINE Floats16<W> operator*(Floats16<W> a, const Floats16<W>& b) {
  GF_LANES_LOOP a.part[k] *= b.part[k];
  return a;
}
template <int W>
GF_CPU_INLINE Floats16<W> operator*(float s, Floats16<W> a) {
  GF_LANES_LOOP a.part[k] = s * a.part[k];
  return a;
}

// Combinations of registers, for larger and reduce_lanes (inlined: a helper left out of line is
// compiled for the baseline).
struct AddLanes {
  template <typename V>
  GF_CPU_INLINE V operator()(V a, V b) const { return a + b; }
};
struct LargerLanes {  // b where b > a, else a (a NaN in b is not taken)
  template <typename V>
  GF_CPU_INLINE V operator()(V a, V b) const { return b > a ? b : a; }
};

template <int W>
GF_CPU_INLINE Floats16<W> larger(Floats16<W> a, const Floats16<W>& b) {
  GF_LANES_LOOP a.part[k] = LargerLanes()(a.part[k], b.part[k]);
  return a;
}

// x where x is NaN, else a: a NaN seen by any step stays in its lane. (An int32 mask of x != x
// comes out of g++ 12 as scalar code with AVX-512, and so does a select on two masks or'ed together.)
template <int W>
GF_CPU_INLINE Floats16<W> keep_nan(Floats16<W> a, const Floats16<W>& x) {
  GF_LANES_LOOP a.part[k] = x.part[k] != x.part[k] ? x.part[k] : a.part[k];
  return a;
}
#undef GF_LANES_LOOP

// The elements i... of a and b concatenated (__builtin_shufflevector, which g++ has from version 12
// on; __builtin_shuffle before it).
template <typename V, int... i>
GF_CPU_INLINE V shuffle(V a, V b) {
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(a, b, i...);
#else
  typedef int32_t Index __attribute__((vector_size(sizeof(int32_t) * sizeof...(i))));
  return __builtin_shuffle(a, b, Index{i...});
#endif
}

// Lane j of the result is lane j ^ d of v (d < W).
template <int d, typename V, size_t... j>
GF_CPU_INLINE V swap_lanes(V v, std::index_sequence<j...>) {
  return shuffle<V, static_cast<int>(j ^ d)...>(v, v);
}

// combine over the 16 lanes in a fixed tree: lane j with lane j ^ d for d = 8, 4, 2, 1 (a chain of
// 15 dependent scalar operations would be latency-bound). At widths below 16 the first steps
// combine whole registers, which is the same tree.
template <int W, typename Combine>
GF_CPU_INLINE float reduce_lanes(Floats16<W> v, Combine combine) {
  typedef typename Floats16<W>::Part Part;
  Part p[Floats16<W>::kParts];
  for (int k = 0; k < Floats16<W>::kParts; ++k) p[k] = v.part[k];
  for (int n = Floats16<W>::kParts; n > 1; n /= 2) {
    for (int k = 0; k < n / 2; ++k) p[k] = combine(p[k], p[k + n / 2]);
  }
  Part x = p[0];
  if constexpr (W >= 16) x = combine(x, swap_lanes<8>(x, std::make_index_sequence<W>()));
  if constexpr (W >= 8) x = combine(x, swap_lanes<4>(x, std::make_index_sequence<W>()));
  x = combine(x, swap_lanes<2>(x, std::make_index_sequence<W>()));
  x = combine(x, swap_lanes<1>(x, std::make_index_sequence<W>()));
  return x[0];
}

// Rows i and i + s of a 16 x 16 block with their off-diagonal s x s blocks swapped: after the
// steps s = 8, 4, 2, 1 the block is transposed. Steps of a register or more move whole registers.
template <int s, typename V, size_t... j>
GF_CPU_INLINE V swap_low(V a, V b, std::index_sequence<j...>) {
  return shuffle<V, static_cast<int>((j & s) == 0 ? j : sizeof...(j) + j - s)...>(a, b);
}
template <int s, typename V, size_t... j>
GF_CPU_INLINE V swap_high(V a, V b, std::index_sequence<j...>) {
  return shuffle<V, static_cast<int>((j & s) == 0 ? j + s : sizeof...(j) + j)...>(a, b);
}
template <int s, int W>
GF_CPU_INLINE void transpose_step(Floats16<W> rows[kCols]) {
  for (int i = 0; i < kCols; ++i) {
    if ((i & s) != 0) continue;
    const Floats16<W> a = rows[i], b = rows[i + s];
    for (int k = 0; k < Floats16<W>::kParts; ++k) {
      if constexpr (s >= W) {
        const int other = k ^ (s / W);
        rows[i].part[k] = ((k * W) & s) == 0 ? a.part[k] : b.part[other];
        rows[i + s].part[k] = ((k * W) & s) == 0 ? a.part[other] : b.part[k];
      } else {
        rows[i].part[k] = swap_low<s>(a.part[k], b.part[k], std::make_index_sequence<W>());
        rows[i + s].part[k] = swap_high<s>(a.part[k], b.part[k], std::make_index_sequence<W>());
      }
    }
  }
}

template <int W>
GF_CPU_INLINE void transpose16(Floats16<W> rows[kCols]) {
  transpose_step<8>(rows);
  transpose_step<4>(rows);
  transpose_step<2>(rows);
  transpose_step<1>(rows);
}

}  // namespace
}  // namespace genfast
