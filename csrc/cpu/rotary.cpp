// genfast::rotary and rotary_ on the CPU: head rows in parallel, in the input's memory order; each
// row's planes turned in a loop the compiler vectorizes (the layout a template argument, not a branch).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../rotary_args.h"
#include "rotary_row.h"

namespace genfast {
namespace {

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
    const int64_t position = rotary_position(p, b, i);
    turn_head_row<isa, Interleaved>(p.x + b * p.x_strides[0] + i * p.x_strides[1] + h * p.x_strides[2],
                                    p.out + b * p.out_strides[0] + i * p.out_strides[1] + h * p.out_strides[2],
                                    p.cos + position * p.table_stride, p.sin + position * p.table_stride, p.half,
                                    p.head_dim, p.inverse, p.copy_rest, buffer);
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
