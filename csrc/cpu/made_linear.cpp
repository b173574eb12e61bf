// genfast::made_linear and its backward on the CPU. The forward packs a block of masked weight
// rows (the mask computed from the degrees) once and runs every sample against it; the backward's
// sums run over samples (grad_weight, grad_bias) or outputs (grad_x) in a fixed order. Loops over
// features are vector loops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../made_linear_args.h"
#include "cpu_features.h"
#include "ordered_sum.h"

namespace genfast {
namespace {

constexpr int64_t kOutBlock = 4;  // weight rows packed together

// sums[r] = x . w_r for the kOutBlock packed rows w (each of n floats), in a fixed lane order.
GF_CPU_CLONES void dot_block(const float* __restrict x, const float* __restrict w, int64_t n, float sums[kOutBlock]) {
  float lanes[kOutBlock][kSumLanes] = {};
  int64_t j = 0;
  for (; j + kSumLanes <= n; j += kSumLanes) {
    for (int r = 0; r < kOutBlock; ++r) {
      for (int l = 0; l < kSumLanes; ++l) lanes[r][l] += w[r * n + j + l] * x[j + l];
    }
  }
  for (int r = 0; r < kOutBlock; ++r) {
    for (int l = 0; j + l < n; ++l) lanes[r][l] += w[r * n + j + l] * x[j + l];
    sums[r] = ordered_sum(lanes[r], kSumLanes);
  }
}

// dst = (connected ? src : 0) for one weight row.
GF_CPU_CLONES void masked_row(const float* __restrict src, const int32_t* __restrict in_degrees, int32_t out_degree,
                              bool strict, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = made_connected(out_degree, in_degrees[j], strict) ? src[j] : 0.0f;
}

GF_CPU_CLONES void add_scaled_row(float* __restrict dst, const float* __restrict src, float scale, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += scale * src[j];
}

template <typename T>
void made_linear_typed(const MadeLinearParams<T>& p) {
  const int64_t n = p.in_features, blocks = (p.out_features + kOutBlock - 1) / kOutBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> packed(static_cast<size_t>(kOutBlock * n));
    for (int64_t block = first; block < last; ++block) {
      const int64_t k0 = block * kOutBlock, count = std::min(kOutBlock, p.out_features - k0);
      for (int64_t r = 0; r < kOutBlock; ++r) {
        float* dst = packed.data() + r * n;
        if (r < count) {
          masked_row(p.weight + (k0 + r) * n, p.in_degrees, p.out_degrees[k0 + r], p.strict, dst, n);
        } else {
          std::fill(dst, dst + n, 0.0f);
        }
      }
      for (int64_t row = 0; row < p.rows; ++row) {
        float sums[kOutBlock];
        dot_block(p.x + row * n, packed.data(), n, sums);
        for (int64_t r = 0; r < count; ++r) {
          const float bias = p.bias != nullptr ? p.bias[k0 + r] : 0.0f;
          p.y[row * p.out_features + k0 + r] = static_cast<T>(sums[r] + bias);
        }
      }
    }
  });
}

void made_linear_backward_impl(const MadeLinearBackwardParams& p) {
  const MadeLinearParams<float>& f = p.forward;
  const int64_t n = f.in_features, out = f.out_features;
  // grad_weight and grad_bias: one output row at a time, summing over samples in order.
  at::parallel_for(0, out, 1, [&](int64_t first, int64_t last) {
    std::vector<float> acc(static_cast<size_t>(n));
    for (int64_t k = first; k < last; ++k) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      float bias_sum = 0.0f;
      for (int64_t row = 0; row < f.rows; ++row) {
        const float g = p.grad_y[row * out + k];
        bias_sum += g;
        add_scaled_row(acc.data(), f.x + row * n, g, n);
      }
      masked_row(acc.data(), f.in_degrees, f.out_degrees[k], f.strict, p.grad_weight + k * n, n);
      p.grad_bias[k] = bias_sum;
    }
  });
  // grad_x: one sample at a time, summing over outputs in order.
  at::parallel_for(0, f.rows, 1, [&](int64_t first, int64_t last) {
    std::vector<float> masked(static_cast<size_t>(n));
    for (int64_t row = first; row < last; ++row) {
      float* gx = p.grad_x + row * n;
      std::fill(gx, gx + n, 0.0f);
      for (int64_t k = 0; k < out; ++k) {
        masked_row(f.weight + k * n, f.in_degrees, f.out_degrees[k], f.strict, masked.data(), n);
        add_scaled_row(gx, masked.data(), p.grad_y[row * out + k], n);
      }
    }
  });
}

at::Tensor made_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& in_degrees, const at::Tensor& out_degrees, bool strict) {
  const MadeLinearTensors t = prepare_made_linear(x, weight, bias, in_degrees, out_degrees);
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (y.numel() == 0) return y;
  const auto run = [&](auto type) {
    using T = decltype(type);
    made_linear_typed(made_linear_params<T, T>(t, strict, y));
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: run(at::BFloat16{}); break;
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> made_linear_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& in_degrees,
                                                                        const at::Tensor& out_degrees, bool strict) {
  const MadeLinearTensors t = prepare_made_linear(x, weight, std::nullopt, in_degrees, out_degrees);
  MadeLinearGradTensors g = prepare_made_linear_grads(grad_y, t);
  made_linear_backward_impl(made_linear_backward_params(t, strict, g));
  return finish_made_linear_grads(g, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("made_linear", &made_linear_cpu);
  m.impl("made_linear_backward", &made_linear_backward_cpu);
}

}  // namespace genfast
