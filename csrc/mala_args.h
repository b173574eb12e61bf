// Checks and the per-sample decision of genfast::mala_accept, shared by its CPU and CUDA bindings.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/common/mala.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kMalaAcceptOp = "genfast.mala_accept";
constexpr int64_t kMalaChunk = 1 << 14;

inline void check_per_sample(const at::Tensor& like, const at::Tensor& t, const char* name, bool allow_one) {
  const int64_t rows = like.size(0);
  TORCH_CHECK(t.dim() <= 1 && (t.numel() == rows || (allow_one && t.numel() == 1)), kMalaAcceptOp, ": ", name,
              " must hold one value per sample (x.shape[0] = ", rows, "), got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), kMalaAcceptOp, ": ", name, " must be on the device of x (",
              like.device(), "), got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), kMalaAcceptOp, ": ", name, " must be floating point, got ",
              t.scalar_type());
}

inline void check_mala_accept(const at::Tensor& x, const at::Tensor& y, const at::Tensor& grad_x,
                              const at::Tensor& grad_y, const at::Tensor& energy_x, const at::Tensor& energy_y,
                              const at::Tensor& step_size, const at::Tensor& uniform, const at::Tensor& x_out,
                              const at::Tensor& grad_out, const at::Tensor& energy_out, const at::Tensor& accepted) {
  const char* op = kMalaAcceptOp;
  check_floating_input(op, x, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-d tensor");
  check_like(op, x, "x", y, "y");
  check_like(op, x, "x", grad_x, "grad_x");
  check_like(op, x, "x", grad_y, "grad_y");
  check_like(op, x, "x", x_out, "x_out");
  check_like(op, x, "x", grad_out, "grad_out");
  check_per_sample(x, energy_x, "energy_x", false);
  check_per_sample(x, energy_y, "energy_y", false);
  check_per_sample(x, energy_out, "energy_out", false);
  check_per_sample(x, step_size, "step_size", true);
  check_per_sample(x, uniform, "uniform", false);
  TORCH_CHECK(accepted.scalar_type() == at::kBool && accepted.numel() == x.size(0), op,
              ": accepted must be a bool tensor with one value per sample, got ", accepted.scalar_type(), " ",
              accepted.sizes());
}

// accepted = log u < E(x) - E(y) - (sum of pass 1) / 4; energy_out = the kept sample's energy.
// A NaN anywhere rejects the proposal.
inline void mala_decide(const at::Tensor& partial, const at::Tensor& energy_x, const at::Tensor& energy_y,
                        const at::Tensor& uniform, const at::Tensor& energy_out, const at::Tensor& accepted) {
  const at::Tensor log_alpha =
      energy_x.to(at::kDouble) - energy_y.to(at::kDouble) - partial.to(at::kDouble).sum(1) / 4;
  accepted.copy_(uniform.to(at::kDouble).reshape({-1}).log() < log_alpha);
  energy_out.copy_(at::where(accepted.reshape(energy_x.sizes()), energy_y, energy_x));
}

struct MalaLayout {
  int64_t rows, row_size, num_chunks;
};

inline MalaLayout mala_layout(const at::Tensor& x) {
  const int64_t rows = x.size(0);
  const int64_t row_size = rows == 0 ? 0 : x.numel() / rows;
  return {rows, row_size, (row_size + kMalaChunk - 1) / kMalaChunk};
}

// Pass 1, the decision, pass 2; sums(params) and select(params) launch the two kernels of a
// backend. T is the kernels' element type, Storage the tensors' (they differ on CUDA for 16-bit types).
template <typename T, typename Storage, typename Sums, typename Select>
void run_mala_accept(const at::Tensor& x, const at::Tensor& y, const at::Tensor& grad_x, const at::Tensor& grad_y,
                     const at::Tensor& energy_x, const at::Tensor& energy_y, const at::Tensor& step_size,
                     const at::Tensor& uniform, const at::Tensor& x_out, const at::Tensor& grad_out,
                     const at::Tensor& energy_out, const at::Tensor& accepted, Sums sums_kernel,
                     Select select_kernel) {
  const MalaLayout layout = mala_layout(x);
  const at::Tensor xc = x.contiguous(), yc = y.contiguous(), gxc = grad_x.contiguous(), gyc = grad_y.contiguous();
  const at::Tensor steps = step_size.to(at::kFloat).contiguous();
  at::Tensor partial = at::empty({layout.rows, layout.num_chunks}, x.options().dtype(at::kFloat));
  MalaSumsParams<T> sums{layout.rows, layout.row_size, kMalaChunk, layout.num_chunks,
                         input_ptr<T, Storage>(xc), input_ptr<T, Storage>(yc), input_ptr<T, Storage>(gxc),
                         input_ptr<T, Storage>(gyc), steps.const_data_ptr<float>(), steps.numel() > 1,
                         partial.mutable_data_ptr<float>()};
  sums_kernel(sums);
  mala_decide(partial, energy_x, energy_y, uniform, energy_out, accepted);

  // Rows kept in place need no copy when the outputs are the contiguous inputs themselves.
  const at::Tensor x_dst = x_out.is_same(x) && x.is_contiguous() ? xc : contiguous_output(x_out);
  const at::Tensor g_dst = grad_out.is_same(grad_x) && grad_x.is_contiguous() ? gxc : contiguous_output(grad_out);
  const at::Tensor accepted_c = accepted.contiguous();
  MalaSelectParams<T> select{x.numel(), layout.row_size, accepted_c.const_data_ptr<bool>(),
                             input_ptr<T, Storage>(xc), input_ptr<T, Storage>(yc), input_ptr<T, Storage>(gxc),
                             input_ptr<T, Storage>(gyc), output_ptr<T, Storage>(x_dst), output_ptr<T, Storage>(g_dst)};
  select_kernel(select);
  copy_back_if_buffered(x_dst, x_out);
  copy_back_if_buffered(g_dst, grad_out);
}

}  // namespace genfast
