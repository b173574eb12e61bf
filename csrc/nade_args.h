// Checks and preparation shared by the bindings of genfast::nade_conditionals.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <vector>

#include "../kernels/common/nade.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kNadeOp = "genfast.nade_conditionals";

struct NadeTensors {
  at::Tensor x, w_t, c, v, b, ordering;
  NadeActivation activation;
  at::Tensor uniforms, observed;  // sampling only
  int64_t num_observed = 0;
};

inline void check_nade_param(const char* op, const at::Tensor& anchor, const char* anchor_name, const at::Tensor& p,
                             const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(p.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
              ", got ", p.sizes());
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), op, ": ", name, " must be floating point, got ", p.scalar_type());
  TORCH_CHECK(p.device() == anchor.device(), op, ": ", name, " must be on the device of ", anchor_name, " (",
              anchor.device(), "), got ", p.device());
}

// The parameters as float32 (W transposed), the ordering and the activation, checked against
// (rows, dims) and the device of `anchor`. On the CPU also checks that each ordering is a
// permutation (a GPU check would synchronize).
inline NadeTensors prepare_nade_model(const char* op, const at::Tensor& anchor, const char* anchor_name, int64_t rows,
                                      int64_t dims, const at::Tensor& W, const at::Tensor& c, const at::Tensor& V,
                                      const at::Tensor& b, const std::optional<at::Tensor>& ordering,
                                      std::string_view activation) {
  TORCH_CHECK(W.dim() == 2, op, ": W must have shape (H, D), got ", W.sizes());
  const int64_t hidden = W.size(0);
  check_nade_param(op, anchor, anchor_name, W, "W", {hidden, dims});
  check_nade_param(op, anchor, anchor_name, c, "c", {hidden});
  check_nade_param(op, anchor, anchor_name, V, "V", {dims, hidden});
  check_nade_param(op, anchor, anchor_name, b, "b", {dims});
  TORCH_CHECK(activation == "sigmoid" || activation == "relu", op, ": activation must be sigmoid or relu, got ",
              activation);
  NadeTensors t;
  t.activation = activation == "relu" ? NadeActivation::kRelu : NadeActivation::kSigmoid;
  t.w_t = W.to(at::kFloat).t().contiguous();
  t.c = c.to(at::kFloat).contiguous();
  t.v = V.to(at::kFloat).contiguous();
  t.b = b.to(at::kFloat).contiguous();
  if (ordering) {
    const at::Tensor& o = *ordering;
    TORCH_CHECK(o.scalar_type() == at::kLong, op, ": ordering must be int64, got ", o.scalar_type());
    TORCH_CHECK(o.sizes() == at::IntArrayRef({dims}) || o.sizes() == at::IntArrayRef({rows, dims}), op,
                ": ordering must have shape (D,) = (", dims, ",) or (batch, D) = (", rows, ", ", dims, "), got ",
                o.sizes());
    TORCH_CHECK(o.device() == anchor.device(), op, ": ordering must be on the device of ", anchor_name, " (",
                anchor.device(), "), got ", o.device());
    t.ordering = o.contiguous();
    if (o.device().is_cpu()) {
      const at::Tensor sorted = std::get<0>(t.ordering.reshape({-1, dims}).sort(1));
      TORCH_CHECK(sorted.numel() == 0 || at::equal(sorted, at::arange(dims, sorted.options()).expand_as(sorted)), op,
                  ": each ordering must be a permutation of 0..", dims - 1);
    }
  }
  return t;
}

// On the CPU x must be binary (checked).
inline NadeTensors prepare_nade(const at::Tensor& x, const at::Tensor& W, const at::Tensor& c, const at::Tensor& V,
                                const at::Tensor& b, const std::optional<at::Tensor>& ordering,
                                std::string_view activation) {
  const char* op = kNadeOp;
  check_floating_input(op, x, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape (batch, D), got ", x.sizes());
  NadeTensors t = prepare_nade_model(op, x, "x", x.size(0), x.size(1), W, c, V, b, ordering, activation);
  t.x = x.contiguous();
  if (x.device().is_cpu()) {
    const at::Tensor xf = t.x.to(at::kFloat);
    TORCH_CHECK(at::logical_or(xf == 0, xf == 1).all().item<bool>(), op, ": x must be binary (0 or 1)");
  }
  return t;
}

inline void check_nade_cuda_hidden(const char* op, const NadeTensors& t) {
  TORCH_CHECK(t.w_t.size(1) <= kNadeCudaMaxHidden, op, ": the CUDA kernels hold a sample's hidden units in one warp's ",
              "registers: H must be <= ", kNadeCudaMaxHidden, ", got H = ", t.w_t.size(1),
              " (impl='triton' takes up to 2048)");
}

template <typename T, typename Storage>
NadeConditionalsParams<T> nade_params(const NadeTensors& t, const at::Tensor& logits) {
  return {t.x.size(0),
          t.x.size(1),
          t.w_t.size(1),
          input_ptr<T, Storage>(t.x),
          t.w_t.const_data_ptr<float>(),
          t.c.const_data_ptr<float>(),
          t.v.const_data_ptr<float>(),
          t.b.const_data_ptr<float>(),
          t.ordering.defined() ? t.ordering.const_data_ptr<int64_t>() : nullptr,
          t.ordering.defined() && t.ordering.dim() == 2,
          t.activation,
          output_ptr<T, Storage>(logits)};
}

struct NadeGradTensors {
  at::Tensor grad_logits, grad_w_t, grad_v, grad_b, grad_c, grad_x;
  int64_t rows_per_chunk;
};

// Rows per chunk of the backward's partial sums: at most 4 chunks, a multiple of `tile` rows,
// fixed by the shape alone (deterministic sums).
inline NadeGradTensors prepare_nade_grads(const at::Tensor& grad_logits, const NadeTensors& t, int64_t tile) {
  const char* op = "genfast.nade_conditionals_backward";
  TORCH_CHECK(grad_logits.sizes() == t.x.sizes(), op, ": grad_logits must have the shape of x ", t.x.sizes(),
              ", got ", grad_logits.sizes());
  TORCH_CHECK(grad_logits.device() == t.x.device(), op, ": grad_logits must be on the device of x");
  const int64_t rows = t.x.size(0), dims = t.x.size(1), hidden = t.w_t.size(1);
  const int64_t tiles = std::max<int64_t>(1, (rows + tile - 1) / tile);
  const int64_t rows_per_chunk = std::max<int64_t>(1, (tiles + 3) / 4) * tile;
  const int64_t chunks = rows == 0 ? 0 : (rows + rows_per_chunk - 1) / rows_per_chunk;
  const auto floats = t.x.options().dtype(at::kFloat);
  return {grad_logits.to(t.x.scalar_type()).contiguous(),
          at::zeros({chunks, dims, hidden}, floats),
          at::zeros({chunks, dims, hidden}, floats),
          at::zeros({chunks, dims}, floats),
          at::zeros({chunks, hidden}, floats),
          at::zeros({rows, dims}, floats),
          rows_per_chunk};
}

template <typename T, typename Storage>
NadeBackwardParams<T> nade_backward_params(const NadeTensors& t, NadeGradTensors& g) {
  return {nade_params<T, Storage>(t, at::Tensor()),
          input_ptr<T, Storage>(g.grad_logits),
          g.rows_per_chunk,
          g.grad_w_t.size(0),
          g.grad_w_t.mutable_data_ptr<float>(),
          g.grad_v.mutable_data_ptr<float>(),
          g.grad_b.mutable_data_ptr<float>(),
          g.grad_c.mutable_data_ptr<float>(),
          g.grad_x.mutable_data_ptr<float>()};
}

// The chunks' sums in order, in the parameters' dtypes (grad_W back to (H, D)).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_nade_grads(
    const NadeGradTensors& g, const at::Tensor& x, const at::Tensor& W, const at::Tensor& c, const at::Tensor& V,
    const at::Tensor& b) {
  return {g.grad_w_t.sum(0).t().contiguous().to(W.scalar_type()), g.grad_c.sum(0).to(c.scalar_type()),
          g.grad_v.sum(0).to(V.scalar_type()), g.grad_b.sum(0).to(b.scalar_type()), g.grad_x.to(x.scalar_type())};
}

constexpr const char* kNadeSampleOp = "genfast.nade_sample";

// The sampling op's inputs; the samples' dtype is checked here, their values are not read.
inline NadeTensors prepare_nade_sample(const at::Tensor& W, const at::Tensor& c, const at::Tensor& V,
                                       const at::Tensor& b, int64_t num_samples, at::ScalarType dtype,
                                       const std::optional<at::Tensor>& uniforms,
                                       const std::optional<at::Tensor>& ordering,
                                       const std::optional<at::Tensor>& observed, int64_t num_observed,
                                       std::string_view activation) {
  const char* op = kNadeSampleOp;
  TORCH_CHECK(num_samples >= 0, op, ": num_samples must be >= 0, got ", num_samples);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(W.dim() == 2, op, ": W must have shape (H, D), got ", W.sizes());
  const int64_t dims = W.size(1);
  NadeTensors t = prepare_nade_model(op, W, "W", num_samples, dims, W, c, V, b, ordering, activation);
  if (uniforms) {
    check_nade_param(op, W, "W", *uniforms, "uniforms", {num_samples, dims});
    t.uniforms = uniforms->to(at::kFloat).contiguous();
  }
  TORCH_CHECK(0 <= num_observed && num_observed <= dims, op, ": num_observed must be in [0, D = ", dims, "], got ",
              num_observed);
  if (num_observed > 0) {
    TORCH_CHECK(observed.has_value(), op, ": observed must be given when num_observed > 0");
    check_nade_param(op, W, "W", *observed, "observed", {num_samples, dims});
    t.observed = observed->to(at::kFloat).contiguous();
    t.num_observed = num_observed;
    if (W.device().is_cpu()) {
      const at::Tensor order = t.ordering.defined() ? t.ordering.expand({num_samples, dims})
                                                    : at::arange(dims, t.observed.options().dtype(at::kLong))
                                                          .expand({num_samples, dims});
      const at::Tensor seen = t.observed.gather(1, order.slice(1, 0, num_observed));
      TORCH_CHECK(at::logical_or(seen == 0, seen == 1).all().item<bool>(), op,
                  ": observed must be binary (0 or 1) at the first num_observed dimensions of the ordering");
    }
  }
  return t;
}

template <typename T, typename Storage>
NadeSampleParams<T> nade_sample_params(const NadeTensors& t, const PhiloxKeyRef& key, const at::Tensor& samples) {
  return {samples.size(0),
          samples.size(1),
          t.w_t.size(1),
          t.w_t.const_data_ptr<float>(),
          t.c.const_data_ptr<float>(),
          t.v.const_data_ptr<float>(),
          t.b.const_data_ptr<float>(),
          t.ordering.defined() ? t.ordering.const_data_ptr<int64_t>() : nullptr,
          t.ordering.defined() && t.ordering.dim() == 2,
          t.activation,
          t.uniforms.defined() ? t.uniforms.const_data_ptr<float>() : nullptr,
          key,
          t.observed.defined() ? t.observed.const_data_ptr<float>() : nullptr,
          t.num_observed,
          output_ptr<T, Storage>(samples)};
}

}  // namespace genfast
