// genfast::rotary and rotary_ on the CPU: head rows in parallel, in the input's memory order; each
// row's planes turned in a loop the compiler vectorizes (the layout a template argument, not a branch).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../rotary_args.h"

namespace genfast {
namespace {

// One head row of x (features contiguous) turned into out at a row of the tables.
template <typename T, bool Interleaved>
void turn_head(const RotaryParams<T>& p, const T* in, T* to, int64_t position) {
  const int64_t half = p.half;
  const T* cos = p.cos + position * p.table_stride;
  const T* sin = p.sin + position * p.table_stride;
#pragma omp simd
  for (int64_t m = 0; m < half; ++m) {
    const int64_t a = Interleaved ? 2 * m : m, b = Interleaved ? 2 * m + 1 : m + half;
    float first, second;
    rotary_turn(static_cast<float>(in[a]), static_cast<float>(in[b]), static_cast<float>(cos[m]),
                rotary_sine(static_cast<float>(sin[m]), p.inverse), &first, &second);
    to[a] = static_cast<T>(first);
    to[b] = static_cast<T>(second);
  }
  if (p.copy_rest) std::memcpy(to + 2 * half, in + 2 * half, sizeof(T) * (p.head_dim - 2 * half));
}

// Head rows in parallel, taken in x's memory order: token-major for (batch, seqlen, heads, dim)
// tensors, head-major for transposed views of (batch, heads, seqlen, dim) ones (transformers'
// layout), so that each thread streams through memory instead of striding by whole sequences.
template <typename T, bool Interleaved>
void rotary_rows(const RotaryParams<T>& p) {
  const bool heads_outer = p.x_strides[2] > p.x_strides[1];
  const int64_t inner = heads_outer ? p.seqlen : p.heads;
  const int64_t per_batch = p.seqlen * p.heads;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.head_dim));
  at::parallel_for(0, p.batch * per_batch, grain, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t b = row / per_batch, outer_index = (row % per_batch) / inner, inner_index = row % inner;
      const int64_t i = heads_outer ? inner_index : outer_index, h = heads_outer ? outer_index : inner_index;
      turn_head<T, Interleaved>(p, p.x + b * p.x_strides[0] + i * p.x_strides[1] + h * p.x_strides[2],
                                p.out + b * p.out_strides[0] + i * p.out_strides[1] + h * p.out_strides[2],
                                rotary_position(p, b, i));
    }
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
        rotary_rows<T, true>(p);
      } else {
        rotary_rows<T, false>(p);
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
