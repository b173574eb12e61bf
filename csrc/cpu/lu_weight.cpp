// genfast::lu_weight and its backward on the CPU: each output row is an independent task.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../lu_weight_args.h"

namespace genfast {
namespace {

int64_t rows_grain(int64_t n) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n * n)); }

std::tuple<at::Tensor, at::Tensor> lu_weight_cpu(const at::Tensor& lower, const at::Tensor& upper,
                                                 const at::Tensor& log_diag, const at::Tensor& sign,
                                                 const at::Tensor& perm) {
  const LuTensors t = prepare_lu(lower, upper, log_diag, sign, perm);
  at::Tensor weight = at::empty_like(t.lower);
  const LuWeightParams p = lu_weight_params(t, weight);
  at::parallel_for(0, p.n, rows_grain(p.n), [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      for (int64_t j = 0; j < p.n; ++j) p.weight[i * p.n + j] = lu_weight_entry(p, i, j);
    }
  });
  return {weight, log_diag.sum()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lu_weight_backward_cpu(const at::Tensor& grad_weight,
                                                                      const at::Tensor& grad_logabsdet,
                                                                      const at::Tensor& lower,
                                                                      const at::Tensor& upper,
                                                                      const at::Tensor& log_diag,
                                                                      const at::Tensor& sign, const at::Tensor& perm) {
  const LuTensors t = prepare_lu(lower, upper, log_diag, sign, perm);
  const LuGradTensors g = prepare_lu_grads(grad_weight, grad_logabsdet, t);
  const LuWeightBackwardParams p = lu_weight_backward_params(t, g);
  at::parallel_for(0, p.n, rows_grain(p.n), [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t r = p.perm[i];
      for (int64_t k = 0; k < p.n; ++k) p.grad_lower[r * p.n + k] = k < r ? lu_grad_lower_entry(p, i, k) : 0.0f;
      for (int64_t j = 0; j < p.n; ++j) {  // row i of dU
        const float d = j >= i ? lu_grad_upper_entry(p, i, j) : 0.0f;
        p.grad_upper[i * p.n + j] = j > i ? d : 0.0f;
        if (j == i) p.grad_diag[i] = d;
      }
    }
  });
  return {g.grad_lower, g.grad_upper, finish_log_diag_grad(g, t, grad_logabsdet)};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("lu_weight", &lu_weight_cpu);
  m.impl("lu_weight_backward", &lu_weight_backward_cpu);
}

}  // namespace genfast
