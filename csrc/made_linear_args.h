// Checks and preparation shared by the bindings of genfast::made_linear.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../kernels/common/made_linear.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kMadeLinearOp = "genfast.made_linear";

struct MadeLinearTensors {
  at::Tensor x, weight, bias, in_degrees, out_degrees;  // float32 / int32, contiguous
};

inline void check_degrees(const char* op, const at::Tensor& d, const char* name, int64_t size, const at::Tensor& x) {
  TORCH_CHECK(d.scalar_type() == at::kLong || d.scalar_type() == at::kInt, op, ": ", name,
              " must be int64 or int32, got ", d.scalar_type());
  TORCH_CHECK(d.sizes() == at::IntArrayRef({size}), op, ": ", name, " must have shape (", size, ",), got ", d.sizes());
  TORCH_CHECK(d.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              d.device());
}

// x (rows, in); weight (out, in) and bias (out) of x's dtype.
inline MadeLinearTensors prepare_made_linear(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& in_degrees,
                                             const at::Tensor& out_degrees) {
  const char* op = kMadeLinearOp;
  check_floating_input(op, x, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape (rows, in_features), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op,
              ": weight must have shape (out_features, in_features = ", x.size(1), "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), op,
              ": weight must have the dtype and device of x (", x.scalar_type(), ", ", x.device(), "), got ",
              weight.scalar_type(), ", ", weight.device());
  const int64_t out = weight.size(0);
  if (bias) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({out}), op, ": bias must have shape (out_features,) = (", out,
                ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), op,
                ": bias must have the dtype and device of x");
  }
  check_degrees(op, in_degrees, "in_degrees", x.size(1), x);
  check_degrees(op, out_degrees, "out_degrees", out, x);
  return {x.to(at::kFloat).contiguous(), weight.to(at::kFloat).contiguous(),
          bias ? bias->to(at::kFloat).contiguous() : at::Tensor(), in_degrees.to(at::kInt).contiguous(),
          out_degrees.to(at::kInt).contiguous()};
}

template <typename T, typename Storage>
MadeLinearParams<T> made_linear_params(const MadeLinearTensors& t, bool strict, const at::Tensor& y) {
  return {t.x.size(0),
          t.x.size(1),
          t.weight.size(0),
          t.x.const_data_ptr<float>(),
          t.weight.const_data_ptr<float>(),
          t.bias.defined() ? t.bias.const_data_ptr<float>() : nullptr,
          t.in_degrees.const_data_ptr<int32_t>(),
          t.out_degrees.const_data_ptr<int32_t>(),
          strict,
          output_ptr<T, Storage>(y)};
}

struct MadeLinearGradTensors {
  at::Tensor grad_y, grad_x, grad_weight, grad_bias;  // float32
};

inline MadeLinearGradTensors prepare_made_linear_grads(const at::Tensor& grad_y, const MadeLinearTensors& t) {
  const int64_t rows = t.x.size(0), out = t.weight.size(0);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({rows, out}), "genfast.made_linear_backward: grad_y must have shape (",
              rows, ", ", out, "), got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device() == t.x.device(), "genfast.made_linear_backward: grad_y must be on the device of x (",
              t.x.device(), "), got ", grad_y.device());
  const auto floats = t.x.options();
  return {grad_y.to(at::kFloat).contiguous(), at::empty_like(t.x), at::empty_like(t.weight),
          at::empty({out}, floats)};
}

inline MadeLinearBackwardParams made_linear_backward_params(const MadeLinearTensors& t, bool strict,
                                                            MadeLinearGradTensors& g) {
  return {made_linear_params<float, float>(t, strict, at::Tensor()), g.grad_y.const_data_ptr<float>(),
          g.grad_x.mutable_data_ptr<float>(), g.grad_weight.mutable_data_ptr<float>(),
          g.grad_bias.mutable_data_ptr<float>()};
}

// The gradients in the dtypes of x, weight and bias.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_made_linear_grads(const MadeLinearGradTensors& g,
                                                                                const at::Tensor& x) {
  return {g.grad_x.to(x.scalar_type()), g.grad_weight.to(x.scalar_type()), g.grad_bias.to(x.scalar_type())};
}

}  // namespace genfast
