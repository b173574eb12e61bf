// genfast::affine_coupling and its backward on the CPU. Work is split into (row, chunk) tasks run
// in parallel; inside a task, blocks of elements are gathered into float32 buffers (x, and t, u
// through the index), then a branch-free loop, compiled per scale function, order and direction,
// computes the block with vector instructions.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../affine_coupling_args.h"
#include "block_loop.h"
#include "cpu_features.h"
#include "ordered_sum.h"

namespace genfast {
namespace {

// The block's t and u at its elements (0 at identity elements) and the mask of transformed ones.
template <typename T>
void gather_block(const int32_t* index, const T* t_row, const T* u_row, int64_t n, float* t, float* u,
                  float* transformed) {
  for (int64_t k = 0; k < n; ++k) {
    const int32_t j = index[k];
    const bool m = j >= 0;
    const int32_t jj = m ? j : 0;
    t[k] = m ? static_cast<float>(t_row[jj]) : 0.0f;
    u[k] = m ? static_cast<float>(u_row[jj]) : 0.0f;
    transformed[k] = m ? 1.0f : 0.0f;
  }
}

// y = the transformed value or x; log_terms = log s at transformed elements, else 0.
template <CpuCapability isa, ScaleFn kFn, bool kGlow, bool kInverse>
GF_CPU_INLINE void forward_block_for(float p, const float* __restrict x, const float* __restrict t,
                                     const float* __restrict u, const float* __restrict transformed,
                                     float* __restrict y, float* __restrict log_terms, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const ScaleTerms s = scale_terms(kFn, p, u[k]);
    const bool m = transformed[k] != 0.0f;
    y[k] = m ? coupling_value(s, x[k], t[k], kGlow, kInverse) : x[k];
    log_terms[k] = m ? s.log_scale : 0.0f;
  }
}
GF_CPU_DISPATCH(forward_block)

template <CpuCapability isa, ScaleFn kFn, bool kGlow, bool kInverse>
GF_CPU_INLINE void backward_block_for(float p, float g_logdet, const float* __restrict x, const float* __restrict t,
                                      const float* __restrict u, const float* __restrict transformed,
                                      const float* __restrict g, float* __restrict gx, float* __restrict gt,
                                      float* __restrict gu, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const ScaleTerms s = scale_terms(kFn, p, u[k]);
    const CouplingGrads r = coupling_grads(s, x[k], t[k], g[k], g_logdet, kGlow, kInverse);
    const bool m = transformed[k] != 0.0f;
    gx[k] = m ? r.x : g[k];
    gt[k] = m ? r.shift : 0.0f;
    gu[k] = m ? r.scale : 0.0f;
  }
}
GF_CPU_DISPATCH(backward_block)

using ForwardBlockFn = void (*)(float, const float*, const float*, const float*, const float*, float*, float*,
                               int64_t);
using BackwardBlockFn = void (*)(float, float, const float*, const float*, const float*, const float*, const float*,
                                 float*, float*, float*, int64_t);

template <ScaleFn kFn>
ForwardBlockFn forward_for_fn(bool glow, bool inverse) {
  if (glow && inverse) return forward_block<kFn, true, true>;
  if (glow) return forward_block<kFn, true, false>;
  if (inverse) return forward_block<kFn, false, true>;
  return forward_block<kFn, false, false>;
}

template <ScaleFn kFn>
BackwardBlockFn backward_for_fn(bool glow, bool inverse) {
  if (glow && inverse) return backward_block<kFn, true, true>;
  if (glow) return backward_block<kFn, true, false>;
  if (inverse) return backward_block<kFn, false, true>;
  return backward_block<kFn, false, false>;
}

// The compiled variant for a scale function (exp by default), order and direction.
template <typename BlockFn, template <ScaleFn> class Select>
BlockFn select_block(ScaleFn fn, bool glow, bool inverse) {
  switch (fn) {
    case ScaleFn::kSigmoid: return Select<ScaleFn::kSigmoid>::get(glow, inverse);
    case ScaleFn::kSoftplus: return Select<ScaleFn::kSoftplus>::get(glow, inverse);
    case ScaleFn::kTanh: return Select<ScaleFn::kTanh>::get(glow, inverse);
    case ScaleFn::kAtan: return Select<ScaleFn::kAtan>::get(glow, inverse);
    case ScaleFn::kSoftBound: return Select<ScaleFn::kSoftBound>::get(glow, inverse);
    case ScaleFn::kSigmoidNoEps: return Select<ScaleFn::kSigmoidNoEps>::get(glow, inverse);
    default: return Select<ScaleFn::kExp>::get(glow, inverse);
  }
}

template <ScaleFn kFn>
struct SelectForward {
  static ForwardBlockFn get(bool glow, bool inverse) { return forward_for_fn<kFn>(glow, inverse); }
};

template <ScaleFn kFn>
struct SelectBackward {
  static BackwardBlockFn get(bool glow, bool inverse) { return backward_for_fn<kFn>(glow, inverse); }
};

// Runs fn(row, begin, end) for each (row, chunk) task in parallel; chunks are fixed by the shape,
// so every sum is the same on any number of threads.
template <typename Fn>
void for_each_row_chunk(const CouplingLayout& layout, int64_t chunk_size, Fn fn) {
  const int64_t chunks = layout.row_size == 0 ? 1 : (layout.row_size + chunk_size - 1) / chunk_size;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, std::min(layout.row_size, chunk_size)));
  at::parallel_for(0, layout.rows * chunks, grain, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t row = task / chunks, chunk = task % chunks;
      const int64_t begin = chunk * chunk_size;
      fn(row, chunk, begin, std::min(begin + chunk_size, layout.row_size));
    }
  });
}

template <typename T>
void affine_coupling_cpu_typed(const AffineCouplingParams<T>& p) {
  const ForwardBlockFn block_fn = select_block<ForwardBlockFn, SelectForward>(p.fn, p.glow_order, p.inverse);
  const float sign = p.inverse ? -1.0f : 1.0f;
  for_each_row_chunk(p.layout, p.chunk_size, [&](int64_t row, int64_t chunk, int64_t begin, int64_t end) {
    alignas(64) float x_buf[kBlock], t_buf[kBlock], u_buf[kBlock], m_buf[kBlock], y_buf[kBlock], log_buf[kBlock];
    const T* x_row = p.x + row * p.x_stride;
    T* y_row = p.y + row * p.layout.row_size;
    double log_sum = 0.0;
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = std::min(kBlock, end - b);
      to_float(x_row + b, x_buf, n);
      gather_block(p.layout.index + b, p.shift + row * p.shift_stride, p.scale + row * p.scale_stride, n, t_buf,
                   u_buf, m_buf);
      block_fn(p.scale_param, x_buf, t_buf, u_buf, m_buf, y_buf, log_buf, n);
      log_sum += ordered_sum(log_buf, n);
      from_float(y_buf, y_row + b, n);
    }
    p.partial[row * p.num_chunks + chunk] = sign * static_cast<float>(log_sum);
  });
}

template <typename T>
void affine_coupling_backward_cpu_typed(const AffineCouplingBackwardParams<T>& p) {
  const BackwardBlockFn block_fn = select_block<BackwardBlockFn, SelectBackward>(p.fn, p.glow_order, p.inverse);
  const CouplingLayout& layout = p.layout;
  for_each_row_chunk(layout, kCouplingChunk, [&](int64_t row, int64_t, int64_t begin, int64_t end) {
    alignas(64) float x_buf[kBlock], t_buf[kBlock], u_buf[kBlock], m_buf[kBlock], g_buf[kBlock];
    alignas(64) float gx_buf[kBlock], gt_buf[kBlock], gu_buf[kBlock];
    T* gt_row = p.grad_shift + row * layout.transformed;
    T* gu_row = p.grad_scale + row * layout.transformed;
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = std::min(kBlock, end - b);
      const int32_t* index = layout.index + b;
      to_float(p.x + row * p.x_stride + b, x_buf, n);
      to_float(p.grad_y + row * p.grad_y_stride + b, g_buf, n);
      gather_block(index, p.shift + row * p.shift_stride, p.scale + row * p.scale_stride, n, t_buf, u_buf, m_buf);
      block_fn(p.scale_param, p.grad_logdet[row], x_buf, t_buf, u_buf, m_buf, g_buf, gx_buf, gt_buf, gu_buf, n);
      from_float(gx_buf, p.grad_x + row * layout.row_size + b, n);
      if (layout.full) {  // every entry of the rows is written, zeros at identity elements
        from_float(gt_buf, gt_row + b, n);
        from_float(gu_buf, gu_row + b, n);
      } else {
        for (int64_t k = 0; k < n; ++k) {
          if (index[k] < 0) continue;
          gt_row[index[k]] = static_cast<T>(gt_buf[k]);
          gu_row[index[k]] = static_cast<T>(gu_buf[k]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                       const at::Tensor& scale, const at::Tensor& index,
                                                       c10::string_view scale_fn, double scale_param,
                                                       bool glow_order, bool inverse) {
  const ScaleFn fn = parse_scale_fn(std::string_view(scale_fn.data(), scale_fn.size()), scale_param);
  const CouplingTensors t = prepare_coupling(x, shift, scale, index);
  const CouplingOutputs out = coupling_outputs(x, t);
  if (t.layout.rows == 0) return {out.y, out.partial.sum(1)};
  dispatch_float_types(x.scalar_type(), [&](auto type) {
    using T = decltype(type);
    affine_coupling_cpu_typed(coupling_params<T, T>(t, fn, scale_param, glow_order, inverse, out.y, out.partial));
  });
  return {out.y, coupling_logdet(out.partial)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x, const at::Tensor& shift,
    const at::Tensor& scale, const at::Tensor& index, c10::string_view scale_fn, double scale_param,
    bool glow_order, bool inverse) {
  const ScaleFn fn = parse_scale_fn(std::string_view(scale_fn.data(), scale_fn.size()), scale_param);
  const CouplingTensors t = prepare_coupling(x, shift, scale, index);
  const auto [g, g_logdet] = prepare_coupling_grads(grad_y, grad_logdet, x, t);
  const auto [grad_x, grad_shift, grad_scale] = coupling_grad_outputs(x, shift, scale);
  if (t.layout.rows == 0) return {grad_x, grad_shift, grad_scale};
  dispatch_float_types(x.scalar_type(), [&](auto type) {
    using T = decltype(type);
    affine_coupling_backward_cpu_typed(coupling_backward_params<T, T>(t, fn, scale_param, glow_order, inverse, g,
                                                                      g_logdet, grad_x, grad_shift, grad_scale));
  });
  return {grad_x, grad_shift, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("affine_coupling", &affine_coupling_cpu);
  m.impl("affine_coupling_backward", &affine_coupling_backward_cpu);
}

}  // namespace genfast
