// genfast::actnorm and its backward on the CPU. Each channel's run of S contiguous elements is
// one vector loop (for (B, C) inputs, S = 1, the loop runs along the channels instead). The
// backward's per-channel sums go to one partial row per chunk of samples, added in order after.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../actnorm_args.h"
#include "block_loop.h"
#include "cpu_features.h"
#include "ordered_sum.h"

namespace genfast {
namespace {

// n elements, each with its own channel parameters (pointers advance with the elements when
// per_element, else one pair for all).
template <CpuCapability isa, bool kGlow, bool kInverse>
GF_CPU_INLINE void actnorm_run_for(const float* __restrict x, const float* __restrict log_scale,
                                   const float* __restrict bias, bool per_element, float* __restrict y, int64_t n) {
  const int64_t step = per_element ? 1 : 0;
  for (int64_t k = 0; k < n; ++k) y[k] = actnorm_value(x[k], log_scale[k * step], bias[k * step], kGlow, kInverse);
}
GF_CPU_DISPATCH(actnorm_run)

// grad_x, and each element's shares of the parameters' gradients.
template <CpuCapability isa, bool kGlow, bool kInverse>
GF_CPU_INLINE void actnorm_grad_run_for(const float* __restrict x, const float* __restrict g,
                                        const float* __restrict log_scale, const float* __restrict bias,
                                        bool per_element, float* __restrict gx, float* __restrict ls_share,
                                        float* __restrict b_share, int64_t n) {
  const int64_t step = per_element ? 1 : 0;
  for (int64_t k = 0; k < n; ++k) {
    const ActNormGrads r = actnorm_grads(x[k], g[k], log_scale[k * step], bias[k * step], kGlow, kInverse);
    gx[k] = r.x;
    ls_share[k] = r.log_scale;
    b_share[k] = r.bias;
  }
}
GF_CPU_DISPATCH(actnorm_grad_run)

// Adds the shares to the partial sums: per channel (one per element) or all to one channel.
void accumulate_shares(const float* ls_share, const float* b_share, bool per_element, float* g_log_scale,
                       float* g_bias, int64_t n) {
  if (per_element) {
    for (int64_t k = 0; k < n; ++k) {
      g_log_scale[k] += ls_share[k];
      g_bias[k] += b_share[k];
    }
  } else {
    g_log_scale[0] += ordered_sum(ls_share, n);
    g_bias[0] += ordered_sum(b_share, n);
  }
}

template <bool kGlow, bool kInverse, typename T>
void actnorm_typed(const ActNormParams<T>& p) {
  const int64_t run = p.inner == 1 ? p.channels : p.inner;  // elements sharing a loop
  const int64_t runs = p.rows * p.channels * p.inner / std::max<int64_t>(1, run);
  at::parallel_for(0, runs, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, run)), [&](int64_t first, int64_t last) {
    alignas(64) float x_buf[kBlock], y_buf[kBlock];
    for (int64_t r = first; r < last; ++r) {
      const int64_t c = p.inner == 1 ? 0 : r % p.channels;
      for (int64_t b = 0; b < run; b += kBlock) {
        const int64_t n = std::min(kBlock, run - b);
        const int64_t i = r * run + b;
        to_float(p.x + i, x_buf, n);
        const int64_t pc = p.inner == 1 ? b : c;
        actnorm_run<kGlow, kInverse>(x_buf, p.log_scale + pc, p.bias + pc, p.inner == 1, y_buf, n);
        from_float(y_buf, p.y + i, n);
      }
    }
  });
}

template <bool kGlow, bool kInverse, typename T>
void actnorm_backward_typed(const ActNormBackwardParams<T>& p) {
  const bool per_element = p.inner == 1;
  at::parallel_for(0, p.num_chunks, 1, [&](int64_t first, int64_t last) {
    alignas(64) float x_buf[kBlock], g_buf[kBlock], gx_buf[kBlock], ls_buf[kBlock], b_buf[kBlock];
    for (int64_t chunk = first; chunk < last; ++chunk) {
      float* g_ls = p.partial_log_scale + chunk * p.channels;
      float* g_b = p.partial_bias + chunk * p.channels;
      const int64_t row_end = std::min(p.rows, (chunk + 1) * p.rows_per_chunk);
      for (int64_t row = chunk * p.rows_per_chunk; row < row_end; ++row) {
        for (int64_t c = 0; c < (per_element ? 1 : p.channels); ++c) {
          const int64_t run = per_element ? p.channels : p.inner;
          const int64_t start = (row * p.channels + c) * p.inner;
          for (int64_t b = 0; b < run; b += kBlock) {
            const int64_t n = std::min(kBlock, run - b);
            to_float(p.x + start + b, x_buf, n);
            to_float(p.grad_y + start + b, g_buf, n);
            const int64_t pc = per_element ? b : c;
            actnorm_grad_run<kGlow, kInverse>(x_buf, g_buf, p.log_scale + pc, p.bias + pc, per_element, gx_buf,
                                              ls_buf, b_buf, n);
            accumulate_shares(ls_buf, b_buf, per_element, g_ls + pc, g_b + pc, n);
            from_float(gx_buf, p.grad_x + start + b, n);
          }
        }
      }
    }
  });
}

// Calls fn(T{}, glow, inverse constants) for the tensor's dtype and the two flags.
template <typename Fn>
void dispatch_actnorm(at::ScalarType dtype, bool glow, bool inverse, Fn fn) {
  const auto with_type = [&](auto type) {
    if (glow) {
      inverse ? fn(type, std::true_type{}, std::true_type{}) : fn(type, std::true_type{}, std::false_type{});
    } else {
      inverse ? fn(type, std::false_type{}, std::true_type{}) : fn(type, std::false_type{}, std::false_type{});
    }
  };
  switch (dtype) {
    case at::kFloat: with_type(float{}); break;
    case at::kHalf: with_type(at::Half{}); break;
    default: with_type(at::BFloat16{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor> actnorm_cpu(const at::Tensor& x, const at::Tensor& log_scale,
                                               const at::Tensor& bias, bool glow_order, bool inverse) {
  const ActNormTensors t = prepare_actnorm(x, log_scale, bias);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() > 0) {
    dispatch_actnorm(x.scalar_type(), glow_order, inverse, [&](auto type, auto glow, auto inv) {
      using T = decltype(type);
      actnorm_typed<decltype(glow)::value, decltype(inv)::value>(actnorm_params<T, T>(t, y, glow_order, inverse));
    });
  }
  return {y, actnorm_logdet(t, inverse)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_backward_cpu(const at::Tensor& grad_y,
                                                                    const at::Tensor& grad_logdet,
                                                                    const at::Tensor& x, const at::Tensor& log_scale,
                                                                    const at::Tensor& bias, bool glow_order,
                                                                    bool inverse) {
  const ActNormTensors t = prepare_actnorm(x, log_scale, bias);
  const int64_t per_chunk =
      std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, t.channels * t.inner));
  const ActNormGradTensors g = prepare_actnorm_grads(grad_y, grad_logdet, x, t, per_chunk);
  if (x.numel() > 0) {
    dispatch_actnorm(x.scalar_type(), glow_order, inverse, [&](auto type, auto glow, auto inv) {
      using T = decltype(type);
      actnorm_backward_typed<decltype(glow)::value, decltype(inv)::value>(
          actnorm_backward_params<T, T>(t, g, glow_order, inverse));
    });
  }
  return finish_actnorm_grads(g, grad_logdet, t, log_scale, bias, inverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("actnorm", &actnorm_cpu);
  m.impl("actnorm_backward", &actnorm_backward_cpu);
}

}  // namespace genfast
