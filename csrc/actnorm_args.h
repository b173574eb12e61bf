// Checks and preparation shared by the CPU and CUDA bindings of genfast::actnorm and its backward.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "../kernels/common/actnorm.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kActNormOp = "genfast.actnorm";

// x as contiguous (B, C, S) and the parameters as float32.
struct ActNormTensors {
  at::Tensor x, log_scale, bias;
  int64_t rows, channels, inner;
};

inline void check_channel_param(const at::Tensor& x, const at::Tensor& p, const char* name) {
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1), kActNormOp, ": ", name, " must have shape (", x.size(1),
              ",), one value per channel of x, got ", p.sizes());
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), kActNormOp, ": ", name, " must be floating point, got ",
              p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), kActNormOp, ": ", name, " must be on the device of x (", x.device(),
              "), got ", p.device());
}

inline ActNormTensors prepare_actnorm(const at::Tensor& x, const at::Tensor& log_scale, const at::Tensor& bias) {
  check_floating_input(kActNormOp, x, "x");
  TORCH_CHECK(x.dim() >= 2, kActNormOp, ": x must have shape (batch, channels, ...), got ", x.sizes());
  check_channel_param(x, log_scale, "log_scale");
  check_channel_param(x, bias, "bias");
  ActNormTensors t;
  t.rows = x.size(0);
  t.channels = x.size(1);
  t.inner = c10::multiply_integers(x.sizes().slice(2));
  t.x = x.contiguous();
  t.log_scale = log_scale.to(at::kFloat).contiguous();
  t.bias = bias.to(at::kFloat).contiguous();
  return t;
}

// S * sum(log_scale) for every sample (negated for the inverse), float32.
inline at::Tensor actnorm_logdet(const ActNormTensors& t, bool inverse) {
  const double factor = static_cast<double>(t.inner) * (inverse ? -1.0 : 1.0);
  return (t.log_scale.sum() * factor).expand({t.rows}).contiguous();
}

// Samples per partial sum of the backward: fixed by the shape alone (deterministic sums).
inline int64_t actnorm_rows_per_chunk(const ActNormTensors& t) {
  return std::max<int64_t>(1, std::min<int64_t>(t.rows, (int64_t{1} << 16) / std::max<int64_t>(1, t.inner)));
}

template <typename T, typename Storage>
ActNormParams<T> actnorm_params(const ActNormTensors& t, const at::Tensor& y, bool glow_order, bool inverse) {
  return ActNormParams<T>{t.rows, t.channels, t.inner, input_ptr<T, Storage>(t.x), t.log_scale.const_data_ptr<float>(),
                          t.bias.const_data_ptr<float>(), output_ptr<T, Storage>(y), glow_order, inverse};
}

struct ActNormGradTensors {
  at::Tensor grad_y, grad_x, partial_log_scale, partial_bias;
  int64_t rows_per_chunk;
};

inline ActNormGradTensors prepare_actnorm_grads(const at::Tensor& grad_y, const at::Tensor& grad_logdet,
                                                const at::Tensor& x, const ActNormTensors& t,
                                                int64_t rows_per_chunk) {
  const char* op = "genfast.actnorm_backward";
  check_like(op, x, "x", grad_y, "grad_y");
  TORCH_CHECK(grad_logdet.numel() == t.rows, op, ": grad_logdet must hold one value per sample (", t.rows,
              "), got shape ", grad_logdet.sizes());
  const int64_t chunks = t.rows == 0 ? 0 : (t.rows + rows_per_chunk - 1) / rows_per_chunk;
  const auto floats = x.options().dtype(at::kFloat);
  return {grad_y.contiguous(), at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)),
          at::zeros({chunks, t.channels}, floats), at::zeros({chunks, t.channels}, floats), rows_per_chunk};
}

template <typename T, typename Storage>
ActNormBackwardParams<T> actnorm_backward_params(const ActNormTensors& t, const ActNormGradTensors& g,
                                                 bool glow_order, bool inverse) {
  return ActNormBackwardParams<T>{t.rows,
                                  t.channels,
                                  t.inner,
                                  input_ptr<T, Storage>(g.grad_y),
                                  input_ptr<T, Storage>(t.x),
                                  t.log_scale.const_data_ptr<float>(),
                                  t.bias.const_data_ptr<float>(),
                                  output_ptr<T, Storage>(g.grad_x),
                                  g.partial_log_scale.mutable_data_ptr<float>(),
                                  g.partial_bias.mutable_data_ptr<float>(),
                                  g.rows_per_chunk,
                                  g.partial_log_scale.size(0),
                                  glow_order,
                                  inverse};
}

// The chunks' sums in order, plus the logdet's share S * sum(grad_logdet) of d log_scale.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_actnorm_grads(const ActNormGradTensors& g,
                                                                           const at::Tensor& grad_logdet,
                                                                           const ActNormTensors& t,
                                                                           const at::Tensor& log_scale,
                                                                           const at::Tensor& bias, bool inverse) {
  const double factor = static_cast<double>(t.inner) * (inverse ? -1.0 : 1.0);
  const at::Tensor grad_ls = g.partial_log_scale.sum(0) + grad_logdet.to(at::kFloat).sum() * factor;
  return {g.grad_x, grad_ls.to(log_scale.scalar_type()), g.partial_bias.sum(0).to(bias.scalar_type())};
}

}  // namespace genfast
