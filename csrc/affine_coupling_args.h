// Checks and preparation shared by the CPU and CUDA bindings of genfast::affine_coupling and its
// backward: every error names the op, the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <string_view>

#include "../kernels/common/affine_coupling.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kAffineCouplingOp = "genfast.affine_coupling";
constexpr int64_t kCouplingChunk = 1 << 14;  // elements of a row per logdet partial sum

inline ScaleFn parse_scale_fn(std::string_view name, double param) {
  const char* op = kAffineCouplingOp;
  ScaleFn fn;
  if (name == "exp") fn = ScaleFn::kExp;
  else if (name == "sigmoid") fn = ScaleFn::kSigmoid;
  else if (name == "softplus") fn = ScaleFn::kSoftplus;
  else if (name == "tanh") fn = ScaleFn::kTanh;
  else if (name == "atan") fn = ScaleFn::kAtan;
  else if (name == "soft_bound") fn = ScaleFn::kSoftBound;
  else TORCH_CHECK(false, op, ": scale_fn must be exp, sigmoid, softplus, tanh, atan or soft_bound, got ", name);
  if (fn == ScaleFn::kSigmoid || fn == ScaleFn::kSoftplus) {
    TORCH_CHECK(param >= 0, op, ": scale_param (eps) of ", name, " must be >= 0, got ", param);
    if (fn == ScaleFn::kSigmoid && param == 0) fn = ScaleFn::kSigmoidNoEps;
  } else if (fn != ScaleFn::kExp) {
    TORCH_CHECK(param > 0, op, ": scale_param of ", name, " must be > 0, got ", param);
  }
  return fn;
}

// x, shift and scale as rows of contiguous elements (any row stride), with the layout.
struct CouplingTensors {
  at::Tensor x, shift, scale, index;
  CouplingLayout layout;
};

// t as (rows, elements per row) with contiguous rows: a view where it can be.
inline at::Tensor rows_view(const at::Tensor& t, int64_t rows, int64_t row_size) {
  at::Tensor v = t.reshape({rows, row_size});
  return row_size <= 1 || v.stride(1) == 1 ? v : v.contiguous();
}

inline CouplingTensors prepare_coupling(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                                        const at::Tensor& index) {
  const char* op = kAffineCouplingOp;
  check_floating_input(op, x, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-d tensor");
  check_like(op, shift, "shift", scale, "scale");
  TORCH_CHECK(shift.dim() >= 1 && shift.size(0) == x.size(0), op, ": shift must have x's batch size ", x.size(0),
              ", got shape ", shift.sizes());
  TORCH_CHECK(shift.scalar_type() == x.scalar_type(), op, ": shift must have the dtype of x (", x.scalar_type(),
              "), got ", shift.scalar_type());
  TORCH_CHECK(shift.device() == x.device(), op, ": shift must be on the device of x (", x.device(), "), got ",
              shift.device());
  const int64_t rows = x.size(0);
  const int64_t row_size = c10::multiply_integers(x.sizes().slice(1));
  const int64_t transformed = c10::multiply_integers(shift.sizes().slice(1));
  TORCH_CHECK(index.scalar_type() == at::kInt && index.dim() == 1 && index.size(0) == row_size, op,
              ": index must be an int32 tensor with one entry per element of a sample (", row_size, "), got ",
              index.scalar_type(), " of shape ", index.sizes());
  TORCH_CHECK(index.device() == x.device(), op, ": index must be on the device of x (", x.device(), "), got ",
              index.device());
  TORCH_CHECK(transformed <= row_size, op, ": shift must hold at most one value per element of a sample (",
              row_size, "), got ", transformed);
  TORCH_CHECK(row_size < (int64_t{1} << 31), op, ": samples of 2^31 elements or more are not supported, got ",
              row_size);

  CouplingTensors t;
  t.index = index.contiguous();
  if (index.device().is_cpu()) {
    // On a GPU this would synchronize; the CUDA kernel turns an out-of-range index into NaN instead.
    const int32_t* entries = t.index.const_data_ptr<int32_t>();
    int64_t count = 0;
    bool in_range = true;
    for (int64_t n = 0; n < row_size; ++n) {
      in_range &= entries[n] >= -1 && entries[n] < transformed;
      count += entries[n] >= 0;
    }
    TORCH_CHECK(in_range, op, ": index entries must be -1 or positions in shift's rows [0, ", transformed, ")");
    TORCH_CHECK(count == transformed || transformed == row_size, op, ": shift and scale must hold the ", count,
                " transformed elements of a sample (or have x's shape), got ", transformed, " per sample");
  }
  if (rows > 0) {
    t.x = rows_view(x, rows, row_size);
    t.shift = rows_view(shift, rows, transformed);
    t.scale = rows_view(scale, rows, transformed);
  }
  t.layout = CouplingLayout{rows, row_size, transformed, t.index.const_data_ptr<int32_t>(), transformed == row_size};
  return t;
}

inline int64_t coupling_chunks(int64_t row_size) {
  return row_size == 0 ? 1 : (row_size + kCouplingChunk - 1) / kCouplingChunk;
}

template <typename T, typename Storage>
AffineCouplingParams<T> coupling_params(const CouplingTensors& t, ScaleFn fn, double param, bool glow_order,
                                        bool inverse, const at::Tensor& y, const at::Tensor& partial) {
  AffineCouplingParams<T> p;
  p.layout = t.layout;
  p.fn = fn;
  p.scale_param = static_cast<float>(param);
  p.glow_order = glow_order;
  p.inverse = inverse;
  p.x = input_ptr<T, Storage>(t.x);
  p.shift = input_ptr<T, Storage>(t.shift);
  p.scale = input_ptr<T, Storage>(t.scale);
  p.x_stride = t.x.stride(0);
  p.shift_stride = t.shift.stride(0);
  p.scale_stride = t.scale.stride(0);
  p.y = output_ptr<T, Storage>(y);
  p.partial = partial.mutable_data_ptr<float>();
  p.chunk_size = kCouplingChunk;
  p.num_chunks = partial.size(1);
  return p;
}

template <typename T, typename Storage>
AffineCouplingBackwardParams<T> coupling_backward_params(const CouplingTensors& t, ScaleFn fn, double param,
                                                         bool glow_order, bool inverse, const at::Tensor& grad_y,
                                                         const at::Tensor& grad_logdet, const at::Tensor& grad_x,
                                                         const at::Tensor& grad_shift,
                                                         const at::Tensor& grad_scale) {
  AffineCouplingBackwardParams<T> p;
  p.layout = t.layout;
  p.fn = fn;
  p.scale_param = static_cast<float>(param);
  p.glow_order = glow_order;
  p.inverse = inverse;
  p.grad_y = input_ptr<T, Storage>(grad_y);
  p.grad_logdet = grad_logdet.const_data_ptr<float>();
  p.x = input_ptr<T, Storage>(t.x);
  p.shift = input_ptr<T, Storage>(t.shift);
  p.scale = input_ptr<T, Storage>(t.scale);
  p.grad_y_stride = grad_y.stride(0);
  p.x_stride = t.x.stride(0);
  p.shift_stride = t.shift.stride(0);
  p.scale_stride = t.scale.stride(0);
  p.grad_x = output_ptr<T, Storage>(grad_x);
  p.grad_shift = output_ptr<T, Storage>(grad_shift);
  p.grad_scale = output_ptr<T, Storage>(grad_scale);
  return p;
}

// The forward's outputs: y (x's shape, contiguous) and the logdet partial sums.
struct CouplingOutputs {
  at::Tensor y, partial;
};

inline CouplingOutputs coupling_outputs(const at::Tensor& x, const CouplingTensors& t) {
  return {at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty({t.layout.rows, coupling_chunks(t.layout.row_size)}, x.options().dtype(at::kFloat))};
}

inline at::Tensor coupling_logdet(const at::Tensor& partial) {
  return partial.size(1) == 1 ? partial.view({-1}) : partial.sum(1);
}

// The backward's outputs: contiguous gradients to x, shift and scale. On a GPU, which does not
// check that the index names every entry of shift and scale (that would synchronise), those start
// at zero: an entry no element reads gets gradient 0, its true gradient.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> coupling_grad_outputs(const at::Tensor& x,
                                                                            const at::Tensor& shift,
                                                                            const at::Tensor& scale) {
  const auto contiguous = [](const at::Tensor& like) {
    return like.is_cuda() ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
  };
  return {at::empty(x.sizes(), x.options()), contiguous(shift), contiguous(scale)};
}

// The backward's checks of grad_y and grad_logdet, returned as rows and float32.
inline std::pair<at::Tensor, at::Tensor> prepare_coupling_grads(const at::Tensor& grad_y,
                                                                const at::Tensor& grad_logdet,
                                                                const at::Tensor& x, const CouplingTensors& t) {
  const char* op = "genfast.affine_coupling_backward";
  check_like(op, x, "x", grad_y, "grad_y");
  TORCH_CHECK(grad_logdet.numel() == t.layout.rows, op, ": grad_logdet must hold one value per sample (",
              t.layout.rows, "), got shape ", grad_logdet.sizes());
  TORCH_CHECK(grad_logdet.device() == x.device(), op, ": grad_logdet must be on the device of x (", x.device(),
              "), got ", grad_logdet.device());
  if (t.layout.rows == 0) return {grad_y, grad_logdet};
  return {rows_view(grad_y, t.layout.rows, t.layout.row_size), grad_logdet.to(at::kFloat).contiguous().view({-1})};
}

}  // namespace genfast
