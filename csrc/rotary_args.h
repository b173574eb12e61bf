// Checks and parameters of genfast::rotary and rotary_ (kernels/common/rotary.h), shared by their
// CPU and CUDA bindings: every error names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <vector>

#include "../kernels/common/rotary.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kRotaryOp = "genfast.rotary";

inline void check_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& positions) {
  const char* op = kRotaryOp;
  check_floating_input(op, x, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be (batch, seqlen, heads, head_dim), got ", x.sizes());
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes() && 2 * cos.size(1) <= x.size(3), op,
              ": cos and sin must be (positions, rotary_dim / 2) with rotary_dim <= head_dim (", x.size(3), "), got ",
              cos.sizes(), " and ", sin.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cos, "cos"}, {sin, "sin"}}) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), op, ": ", name,
                " must have x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ", t.scalar_type(),
                ", ", t.device());
  }
  TORCH_CHECK(positions.scalar_type() == at::kInt && positions.dim() == 2 && positions.size(0) == x.size(0) &&
                  positions.size(1) == x.size(1) && positions.device() == x.device(),
              op, ": positions must be an int32 tensor (batch, seqlen) = (", x.size(0), ", ", x.size(1),
              ") on x's device, got ", positions.scalar_type(), " ", positions.sizes(), " on ", positions.device());
}

// On the CPU, where reading them costs nothing: every position has a row of the tables.
inline void check_rotary_positions(const at::Tensor& positions, const at::Tensor& cos) {
  const int32_t* position = positions.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < positions.size(0); ++b) {
    for (int64_t i = 0; i < positions.size(1); ++i) {
      const int32_t row = position[b * positions.stride(0) + i * positions.stride(1)];
      TORCH_CHECK_VALUE(row >= 0 && row < cos.size(0), kRotaryOp, ": positions[", b, ", ", i, "] = ", row,
                        " must lie in 0 .. ", cos.size(0) - 1, " (the rows of cos and sin)");
    }
  }
}

// x with contiguous features: x itself, or a copy.
inline at::Tensor rotary_input(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

// The kernels' parameters, turning x into out (out may be x); the tables made contiguous into
// `keep` where their features are strided or their row strides differ.
template <typename T, typename Storage>
RotaryParams<T> rotary_params(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& positions, bool interleaved, bool inverse, const at::Tensor& out,
                              std::vector<at::Tensor>& keep) {
  const bool strided_tables = cos.stride(1) != 1 || sin.stride(1) != 1 || sin.stride(0) != cos.stride(0);
  keep.reserve(keep.size() + 2);
  const at::Tensor& c = strided_tables ? keep.emplace_back(cos.contiguous()) : cos;
  const at::Tensor& s = strided_tables ? keep.emplace_back(sin.contiguous()) : sin;
  RotaryParams<T> p{};
  p.batch = x.size(0);
  p.seqlen = x.size(1);
  p.heads = x.size(2);
  p.head_dim = x.size(3);
  p.x = input_ptr<T, Storage>(x);
  p.out = output_ptr<T, Storage>(out);
  for (int d = 0; d < 3; ++d) {
    p.x_strides[d] = x.stride(d);
    p.out_strides[d] = out.stride(d);
  }
  p.cos = input_ptr<T, Storage>(c);
  p.sin = input_ptr<T, Storage>(s);
  p.table_rows = c.size(0);
  p.table_stride = c.size(1) > 0 ? c.stride(0) : 0;
  p.half = c.size(1);
  p.positions = positions.const_data_ptr<int32_t>();
  p.position_strides[0] = positions.stride(0);
  p.position_strides[1] = positions.stride(1);
  p.interleaved = interleaved;
  p.inverse = inverse;
  p.copy_rest = out.data_ptr() != x.data_ptr();
  return p;
}

// Runs launch(input, out) for x turned into a new tensor of x's layout (rotary), or into x itself
// (rotary_, through a buffer where x's features are strided); launch makes the kernels' parameters.
template <typename Launch>
at::Tensor run_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                      bool interleaved, bool inverse, bool in_place, const Launch& launch) {
  check_rotary(x, cos, sin, positions);
  if (in_place) at::assert_no_internal_overlap(x);
  const at::Tensor input = rotary_input(x);
  const at::Tensor out = in_place ? input : at::empty_like(input);
  if (x.numel() > 0) {
    launch(input, out);
  }
  if (in_place && !input.is_same(x)) x.copy_(input);
  return out;
}

}  // namespace genfast
