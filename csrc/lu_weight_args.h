// Checks and preparation shared by the CPU and CUDA bindings of genfast::lu_weight and its backward.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/common/lu_weight.h"

namespace genfast {

constexpr const char* kLuWeightOp = "genfast.lu_weight";

struct LuTensors {
  at::Tensor lower, upper, diag, perm;  // float32 contiguous; diag = sign * exp(log_diag); perm int64
  int64_t n;
};

inline void check_lu_param(const at::Tensor& lower, const at::Tensor& t, const char* name, bool square) {
  const int64_t n = lower.size(0);
  const bool shape_ok = square ? (t.dim() == 2 && t.size(0) == n && t.size(1) == n) : (t.dim() == 1 && t.size(0) == n);
  TORCH_CHECK(shape_ok, kLuWeightOp, ": ", name, " must have shape ", square ? "(n, n)" : "(n,)", " with n = ", n,
              ", got ", t.sizes());
  TORCH_CHECK(t.device() == lower.device(), kLuWeightOp, ": ", name, " must be on the device of lower (",
              lower.device(), "), got ", t.device());
}

inline LuTensors prepare_lu(const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& log_diag,
                            const at::Tensor& sign, const at::Tensor& perm) {
  TORCH_CHECK(lower.dim() == 2 && lower.size(0) == lower.size(1), kLuWeightOp,
              ": lower must be a square matrix, got shape ", lower.sizes());
  check_lu_param(lower, upper, "upper", true);
  check_lu_param(lower, log_diag, "log_diag", false);
  check_lu_param(lower, sign, "sign", false);
  check_lu_param(lower, perm, "perm", false);
  for (const auto& [t, name] : {std::pair{&lower, "lower"}, {&upper, "upper"}, {&log_diag, "log_diag"}, {&sign, "sign"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, kLuWeightOp, ": ", name, " must be float32, got ", t->scalar_type());
  }
  TORCH_CHECK(perm.scalar_type() == at::kLong, kLuWeightOp, ": perm must be int64, got ", perm.scalar_type());
  if (perm.device().is_cpu() && perm.numel() > 0) {
    // A GPU check would synchronize; there the kernels give NaN for a row perm names out of range.
    const bool is_permutation =
        at::equal(std::get<0>(perm.sort()), at::arange(perm.numel(), perm.options()));
    TORCH_CHECK(is_permutation, kLuWeightOp, ": perm must be a permutation of 0..", perm.numel() - 1);
  }
  return {lower.contiguous(), upper.contiguous(), (sign * log_diag.exp()).contiguous(), perm.contiguous(),
          lower.size(0)};
}

inline LuWeightParams lu_weight_params(const LuTensors& t, const at::Tensor& weight) {
  return {t.n, t.lower.const_data_ptr<float>(), t.upper.const_data_ptr<float>(), t.diag.const_data_ptr<float>(),
          t.perm.const_data_ptr<int64_t>(), weight.mutable_data_ptr<float>()};
}

struct LuGradTensors {
  at::Tensor grad_weight, grad_lower, grad_upper, grad_diag;
};

inline LuGradTensors prepare_lu_grads(const at::Tensor& grad_weight, const at::Tensor& grad_logabsdet,
                                      const LuTensors& t) {
  const char* op = "genfast.lu_weight_backward";
  TORCH_CHECK(grad_weight.sizes() == t.lower.sizes() && grad_weight.scalar_type() == at::kFloat, op,
              ": grad_weight must be float32 of shape ", t.lower.sizes(), ", got ", grad_weight.scalar_type(), " ",
              grad_weight.sizes());
  TORCH_CHECK(grad_logabsdet.numel() == 1, op, ": grad_logabsdet must be a scalar, got shape ",
              grad_logabsdet.sizes());
  // grad_lower's rows are written where perm names them: on a GPU, where perm is not checked, the
  // rows a non-permutation leaves out stay zero.
  at::Tensor grad_lower = t.lower.is_cuda() ? at::zeros_like(t.lower) : at::empty_like(t.lower);
  return {grad_weight.contiguous(), grad_lower, at::empty_like(t.upper), at::empty_like(t.diag)};
}

inline LuWeightBackwardParams lu_weight_backward_params(const LuTensors& t, const LuGradTensors& g) {
  return {t.n,
          g.grad_weight.const_data_ptr<float>(),
          t.lower.const_data_ptr<float>(),
          t.upper.const_data_ptr<float>(),
          t.diag.const_data_ptr<float>(),
          t.perm.const_data_ptr<int64_t>(),
          g.grad_lower.mutable_data_ptr<float>(),
          g.grad_upper.mutable_data_ptr<float>(),
          g.grad_diag.mutable_data_ptr<float>()};
}

// d log_diag = dU[k, k] * U[k, k] + d logabsdet.
inline at::Tensor finish_log_diag_grad(const LuGradTensors& g, const LuTensors& t, const at::Tensor& grad_logabsdet) {
  return g.grad_diag * t.diag + grad_logabsdet.to(at::kFloat).reshape({});
}

}  // namespace genfast
