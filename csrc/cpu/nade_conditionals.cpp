// genfast::nade_conditionals and its backward on the CPU. The forward walks tiles of samples
// (nade_steps.h); the backward, chunks of samples with their own partial sums. Loops over H are
// vector loops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../nade_args.h"
#include "nade_steps.h"

namespace genfast {
namespace {

template <NadeActivation kAct, typename T>
void nade_conditionals_typed(const NadeConditionalsParams<T>& p) {
  const int64_t H = p.hidden;
  for_each_nade_step<kAct>(p.rows, p.dims, H, p.c, [&](int64_t row, int64_t k, float* a, float* h, float* products) {
    const int64_t d = nade_step_dim(p.ordering, p.ordering_per_row, row, p.dims, k);
    p.logits[row * p.dims + d] = static_cast<T>(p.b[d] + dot(p.v + d * H, h, products, H));
    const float value = static_cast<float>(p.x[row * p.dims + d]);
    if (value != 0.0f) add_scaled_and_activate<kAct>(a, h, p.w_t + d * H, value, H);
  });
}

// h = act(a) and slope = act'(a), from a.
template <CpuCapability isa, NadeActivation kAct>
GF_CPU_INLINE void activate_with_slope_for(const float* __restrict a, float* __restrict h, float* __restrict slope,
                                           int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) {
    h[j] = nade_activation(kAct, a[j]);
    slope[j] = nade_activation_grad(kAct, a[j], h[j]);
  }
}
GF_CPU_DISPATCH(activate_with_slope)

// The running gradient A += (g V_row) * slope.
template <CpuCapability isa>
GF_CPU_INLINE void add_step_gradient_for(float* __restrict running, const float* __restrict v_row,
                                         const float* __restrict slope, float g, int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) running[j] += g * v_row[j] * slope[j];
}
GF_CPU_DISPATCH(add_step_gradient)

template <NadeActivation kAct, typename T>
void nade_backward_typed(const NadeBackwardParams<T>& p) {
  const NadeConditionalsParams<T>& f = p.forward;
  const int64_t H = f.hidden, D = f.dims;
  at::parallel_for(0, p.num_chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scratch(static_cast<size_t>(5 * H + 16));
    float* a = scratch.data();
    float* running = a + H;
    float* h = running + H;
    float* slope = h + H;
    float* products = slope + H;
    for (int64_t chunk = first; chunk < last; ++chunk) {
      float* gw = p.grad_w_t + chunk * D * H;
      float* gv = p.grad_v + chunk * D * H;
      float* gb = p.grad_b + chunk * D;
      float* gc = p.grad_c + chunk * H;
      const int64_t row_end = std::min(f.rows, (chunk + 1) * p.rows_per_chunk);
      for (int64_t row = chunk * p.rows_per_chunk; row < row_end; ++row) {
        const T* x = f.x + row * D;
        std::copy(f.c, f.c + H, a);  // a after the last step: c + sum of W[:, d] x[d]
        int64_t remaining = 0;       // nonzero x not yet subtracted again
        for (int64_t d = 0; d < D; ++d) {
          const float value = static_cast<float>(x[d]);
          if (value != 0.0f) {
            add_scaled(a, f.w_t + d * H, value, H);
            ++remaining;
          }
        }
        activate_with_slope<kAct>(a, h, slope, H);
        std::fill(running, running + H, 0.0f);
        for (int64_t k = D - 1; k >= 0; --k) {
          const int64_t d = nade_step_dim(f.ordering, f.ordering_per_row, row, D, k);
          const float value = static_cast<float>(x[d]);
          const float* w_row = f.w_t + d * H;
          p.grad_x[row * D + d] = dot(w_row, running, products, H);
          if (value != 0.0f) {  // a (and with it h and the slope) changes only here
            add_scaled(gw + d * H, running, value, H);
            add_scaled(a, w_row, -value, H);  // back to a_k
            // Before the first nonzero x, a_k is c exactly, as in the forward (ReLU's kink at 0).
            if (--remaining == 0) std::copy(f.c, f.c + H, a);
            activate_with_slope<kAct>(a, h, slope, H);
          }
          const float g = static_cast<float>(p.grad_logits[row * D + d]);
          gb[d] += g;
          add_step_gradient(running, f.v + d * H, slope, g, H);
          add_scaled(gv + d * H, h, g, H);
        }
        add_scaled(gc, running, 1.0f, H);
      }
    }
  });
}

at::Tensor nade_conditionals_cpu(const at::Tensor& x, const at::Tensor& W, const at::Tensor& c, const at::Tensor& V,
                                 const at::Tensor& b, const std::optional<at::Tensor>& ordering,
                                 c10::string_view activation) {
  const NadeTensors t =
      prepare_nade(x, W, c, V, b, ordering, std::string_view(activation.data(), activation.size()));
  at::Tensor logits = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return logits;
  const auto run = [&](auto type) {
    using T = decltype(type);
    const NadeConditionalsParams<T> p = nade_params<T, T>(t, logits);
    if (p.activation == NadeActivation::kRelu) {
      nade_conditionals_typed<NadeActivation::kRelu>(p);
    } else {
      nade_conditionals_typed<NadeActivation::kSigmoid>(p);
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: run(at::BFloat16{}); break;
  }
  return logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nade_conditionals_backward_cpu(
    const at::Tensor& grad_logits, const at::Tensor& x, const at::Tensor& W, const at::Tensor& c,
    const at::Tensor& V, const at::Tensor& b, const std::optional<at::Tensor>& ordering, c10::string_view activation) {
  const NadeTensors t =
      prepare_nade(x, W, c, V, b, ordering, std::string_view(activation.data(), activation.size()));
  NadeGradTensors g = prepare_nade_grads(grad_logits, t, kNadeTile);
  const auto run = [&](auto type) {
    using T = decltype(type);
    const NadeBackwardParams<T> p = nade_backward_params<T, T>(t, g);
    if (p.forward.activation == NadeActivation::kRelu) {
      nade_backward_typed<NadeActivation::kRelu>(p);
    } else {
      nade_backward_typed<NadeActivation::kSigmoid>(p);
    }
  };
  if (x.numel() > 0) {
    switch (x.scalar_type()) {
      case at::kFloat: run(float{}); break;
      case at::kHalf: run(at::Half{}); break;
      default: run(at::BFloat16{}); break;
    }
  }
  return finish_nade_grads(g, x, W, c, V, b);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("nade_conditionals", &nade_conditionals_cpu);
  m.impl("nade_conditionals_backward", &nade_conditionals_backward_cpu);
}

}  // namespace genfast
