// genfast::mala_accept on the CPU: per-sample sums (pass 1), the decision, then the copies of the
// kept rows (pass 2; rows kept in place are not touched).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../mala_args.h"
#include "cpu_features.h"

namespace genfast {
namespace {

template <typename T>
void mala_sums_cpu(const MalaSumsParams<T>& p) {
  at::parallel_for(0, p.rows * p.num_chunks, /*grain_size=*/1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t row = task / p.num_chunks, chunk = task % p.num_chunks;
      const int64_t begin = row * p.row_size + chunk * p.chunk_size;
      const int64_t end = std::min(begin + p.chunk_size, (row + 1) * p.row_size);
      const float eps = p.step_size[p.step_size_per_row ? row : 0];
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = begin; i < end; ++i) {
        sum += mala_ratio_term(eps, static_cast<float>(p.x[i]), static_cast<float>(p.y[i]),
                               static_cast<float>(p.grad_x[i]), static_cast<float>(p.grad_y[i]));
      }
      p.partial[task] = static_cast<float>(sum);
    }
  });
}

template <typename T>
void mala_select_cpu(const MalaSelectParams<T>& p) {
  const int64_t rows = p.row_size == 0 ? 0 : p.numel / p.row_size;
  at::parallel_for(0, rows, /*grain_size=*/1, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t offset = row * p.row_size;
      const size_t bytes = static_cast<size_t>(p.row_size) * sizeof(T);
      const T* x_src = p.accepted[row] ? p.y : p.x;
      const T* g_src = p.accepted[row] ? p.grad_y : p.grad_x;
      if (x_src != p.x_out) std::memcpy(p.x_out + offset, x_src + offset, bytes);
      if (g_src != p.grad_out) std::memcpy(p.grad_out + offset, g_src + offset, bytes);
    }
  });
}

void mala_accept_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& grad_x, const at::Tensor& grad_y,
                     const at::Tensor& energy_x, const at::Tensor& energy_y, const at::Tensor& step_size,
                     const at::Tensor& uniform, const at::Tensor& x_out, const at::Tensor& grad_out,
                     const at::Tensor& energy_out, const at::Tensor& accepted) {
  check_mala_accept(x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform, x_out, grad_out, energy_out,
                    accepted);
  if (x.size(0) == 0) return;
  switch (x.scalar_type()) {
    case at::kFloat:
      run_mala_accept<float, float>(x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform, x_out, grad_out,
                                    energy_out, accepted, mala_sums_cpu<float>, mala_select_cpu<float>);
      break;
    case at::kHalf:
      run_mala_accept<at::Half, at::Half>(x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform, x_out,
                                          grad_out, energy_out, accepted, mala_sums_cpu<at::Half>,
                                          mala_select_cpu<at::Half>);
      break;
    default:
      run_mala_accept<at::BFloat16, at::BFloat16>(x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform,
                                                  x_out, grad_out, energy_out, accepted,
                                                  mala_sums_cpu<at::BFloat16>, mala_select_cpu<at::BFloat16>);
      break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("mala_accept", &mala_accept_cpu); }

}  // namespace genfast
