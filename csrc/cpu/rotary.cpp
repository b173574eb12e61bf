// genfast::rotary and rotary_ on the CPU: head rows in parallel, in the input's memory order; each
// row's planes turned in a loop the compiler vectorizes (the layout a template argument, not a branch).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../rotary_args.h"
#include "cpu_features.h"
#include "cpu_vectors.h"

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

// n elements as float32 and back, sixteen at a time in vector registers (cpu_vectors.h: the
// compiler vectorizes neither c10::Half's nor c10::BFloat16's conversions).
template <CpuCapability isa, typename T>
GF_CPU_INLINE void widen(const T* src, float* dst, int64_t n) {
  constexpr int W = kVectorLanes<isa>;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  int64_t j = 0;
  for (; j + kCols <= n; j += kCols) {
    store16(dst + j, std::is_same_v<T, c10::Half> ? load16_float16<W>(bits + j) : load16_bfloat16<W>(bits + j));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <CpuCapability isa, typename T>
GF_CPU_INLINE void narrow(const float* src, T* dst, int64_t n) {
  constexpr int W = kVectorLanes<isa>;
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
  int64_t j = 0;
  for (; j + kCols <= n; j += kCols) {
    if constexpr (std::is_same_v<T, c10::Half>) {
      store16_float16<W>(bits + j, load16<W>(src + j));
    } else {
      store16_bfloat16<W>(bits + j, load16<W>(src + j));
    }
  }
  for (; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// One head row of x (features contiguous) turned into out at a row of the tables. 16-bit rows go
// through float32 buffers (4 half floats at `buffer`), converted a row at a time.
template <CpuCapability isa, bool Interleaved, typename T>
GF_CPU_INLINE void turn_head(const RotaryParams<T>& p, const T* in, T* to, int64_t position, float* buffer) {
  const int64_t half = p.half;
  const T* cos = p.cos + position * p.table_stride;
  const T* sin = p.sin + position * p.table_stride;
  if constexpr (std::is_same_v<T, float>) {
    turn_planes<Interleaved>(in, to, cos, sin, half, p.inverse);
  } else {
    float* x = buffer;
    float* c = buffer + 2 * half;
    float* s = c + half;
    widen<isa>(in, x, 2 * half);
    widen<isa>(cos, c, half);
    widen<isa>(sin, s, half);
    turn_planes<Interleaved>(x, x, c, s, half, p.inverse);
    narrow<isa>(x, to, 2 * half);
  }
  if (p.copy_rest) std::memcpy(to + 2 * half, in + 2 * half, sizeof(T) * (p.head_dim - 2 * half));
}

// Head rows first .. last, taken in x's memory order: token-major for (batch, seqlen, heads, dim)
// tensors, head-major for transposed views of (batch, heads, seqlen, dim) ones (transformers'
// layout), so that each thread streams through memory instead of striding by whole sequences.
// Compiled for each instruction set (cpu_features.h), where the conversions vectorize widest.
template <CpuCapability isa, bool Interleaved, typename T>
GF_CPU_INLINE void turn_rows_for(const RotaryParams<T>* params, int64_t first, int64_t last, float* buffer) {
  const RotaryParams<T>& p = *params;
  const bool heads_outer = p.x_strides[2] > p.x_strides[1];
  const int64_t inner = heads_outer ? p.seqlen : p.heads;
  const int64_t per_batch = p.seqlen * p.heads;
  for (int64_t row = first; row < last; ++row) {
    const int64_t b = row / per_batch, outer_index = (row % per_batch) / inner, inner_index = row % inner;
    const int64_t i = heads_outer ? inner_index : outer_index, h = heads_outer ? outer_index : inner_index;
    turn_head<isa, Interleaved>(p, p.x + b * p.x_strides[0] + i * p.x_strides[1] + h * p.x_strides[2],
                           p.out + b * p.out_strides[0] + i * p.out_strides[1] + h * p.out_strides[2],
                           rotary_position(p, b, i), buffer);
  }
}
GF_CPU_DISPATCH(turn_rows)

template <bool Interleaved, typename T>
void rotary_rows(const RotaryParams<T>& p) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.head_dim));
  at::parallel_for(0, p.batch * p.seqlen * p.heads, grain, [&](int64_t first, int64_t last) {
    std::vector<float> buffer(std::is_same_v<T, float> ? 0 : 4 * p.half);
    turn_rows<Interleaved>(&p, first, last, buffer.data());
  });
}

at::Tensor rotary_cpu_run(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions, bool interleaved, bool inverse, bool in_place) {
  return run_rotary(x, cos, sin, positions, interleaved, inverse, in_place, [&](const at::Tensor& input,
                                                                               const at::Tensor& out) {
    check_rotary_positions(positions, cos);
    std::vector<at::Tensor> keep;
    auto run = [&](auto element) {
      using T = decltype(element);
      const RotaryParams<T> p = rotary_params<T, T>(input, cos, sin, positions, interleaved, inverse, out, keep);
      if (interleaved) {
        rotary_rows<true>(p);
      } else {
        rotary_rows<false>(p);
      }
    };
    dispatch_float_types(x.scalar_type(), run);
  });
}

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                      bool interleaved, bool inverse) {
  return rotary_cpu_run(x, cos, sin, positions, interleaved, inverse, false);
}

void rotary_inplace_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& positions, bool interleaved, bool inverse) {
  rotary_cpu_run(x, cos, sin, positions, interleaved, inverse, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("rotary", &rotary_cpu);
  m.impl("rotary_", &rotary_inplace_cpu);
}

}  // namespace genfast
