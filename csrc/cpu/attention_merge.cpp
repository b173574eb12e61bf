// genfast::attention_merge and its backward on the CPU: rows in parallel, each row's states summed
// into a float32 row in loops the compiler vectorizes (float16 and bfloat16 rows widened and narrowed
// sixteen elements at a time, float16_rows.h). A state of lse -inf has no keys and is not read.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../attention_merge_args.h"
#include "float16_rows.h"

namespace genfast {
namespace {

constexpr float kNoKeys = -__builtin_inff();

// Rows first .. last; buffer holds 2 head_dim floats (none for float32).
template <CpuCapability isa, typename T>
GF_CPU_INLINE void merge_rows_for(const AttentionMergeParams<T>* params, int64_t first, int64_t last, float* buffer) {
  const AttentionMergeParams<T>& p = *params;
  constexpr bool kFloat = std::is_same_v<T, float>;
  const int64_t dim = p.head_dim;
  for (int64_t r = first; r < last; ++r) {
    const AttentionMergeRow<T> row = attention_merge_row(p, r);
  const T* o = row.o;
  const float* lse = row.lse;
  const float merged = row.merged;
    p.out_lse[r] = merged;
    float* sum = nullptr;
    if constexpr (kFloat) {
      sum = p.out + r * dim;
    } else {
      sum = buffer + dim;
    }
    std::fill(sum, sum + dim, 0.0f);
    for (int64_t s = 0; s < p.states; ++s) {
      const float lse_s = lse[attention_merge_state_at(p.lse_states, s)];
      if (lse_s == kNoKeys) continue;
      const float weight = attention_merge_weight(lse_s, merged);
      const float* o_s = nullptr;
      if constexpr (kFloat) {
        o_s = o + attention_merge_state_at(p.o_states, s);
      } else {
        widen<isa>(o + attention_merge_state_at(p.o_states, s), buffer, dim);
        o_s = buffer;
      }
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) sum[c] += weight * o_s[c];
    }
    if constexpr (!kFloat) narrow<isa>(sum, p.out + r * dim, dim);
  }
}
GF_CPU_DISPATCH(merge_rows)

// Rows first .. last of the backward; buffer holds 2 head_dim floats (none for float32). d_s waits
// in grad_lse_states until the row's sum over its states is known.
template <CpuCapability isa, typename T>
GF_CPU_INLINE void merge_backward_rows_for(const AttentionMergeBackwardParams<T>* params, int64_t first, int64_t last,
                                           float* buffer) {
  const AttentionMergeBackwardParams<T>& p = *params;
  constexpr bool kFloat = std::is_same_v<T, float>;
  const int64_t dim = p.head_dim, rows = p.rows_outer * p.rows_inner;
  for (int64_t r = first; r < last; ++r) {
    const AttentionMergeRow<T> row = attention_merge_row(p, r);
  const T* o = row.o;
  const float* lse = row.lse;
  const float merged = row.merged;
    const float* g = nullptr;
    if constexpr (kFloat) {
      g = p.grad_out + r * dim;
    } else {
      widen<isa>(p.grad_out + r * dim, buffer, dim);
      g = buffer;
    }
    float mean = 0.0f;
    for (int64_t s = 0; s < p.states; ++s) {
      const float lse_s = lse[attention_merge_state_at(p.lse_states, s)];
      const bool empty = lse_s == kNoKeys;
      const float weight = empty ? 0.0f : attention_merge_weight(lse_s, merged);
      float dot = 0.0f;
      if (!empty) {
        const float* o_s = nullptr;
        if constexpr (kFloat) {
          o_s = o + attention_merge_state_at(p.o_states, s);
        } else {
          widen<isa>(o + attention_merge_state_at(p.o_states, s), buffer + dim, dim);
          o_s = buffer + dim;
        }
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < dim; ++c) dot += g[c] * o_s[c];
      }
      float* scaled = nullptr;
      if constexpr (kFloat) {
        scaled = p.grad_o + (s * rows + r) * dim;
      } else {
        scaled = buffer + dim;
      }
      if (empty) {
        std::fill(scaled, scaled + dim, 0.0f);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) scaled[c] = weight * g[c];
      }
      if constexpr (!kFloat) narrow<isa>(scaled, p.grad_o + (s * rows + r) * dim, dim);
      p.grad_lse_states[s * rows + r] = dot;
      mean += weight * dot;
    }
    const float grad_lse = p.grad_lse == nullptr ? 0.0f : p.grad_lse[r];
    for (int64_t s = 0; s < p.states; ++s) {
      const float lse_s = lse[attention_merge_state_at(p.lse_states, s)];
      float& out = p.grad_lse_states[s * rows + r];
      out = lse_s == kNoKeys ? 0.0f : attention_merge_weight(lse_s, merged) * (out - mean + grad_lse);
    }
  }
}
GF_CPU_DISPATCH(merge_backward_rows)

// Rows in parallel, about 32K elements of o a task.
template <typename Params, typename Rows>
void parallel_rows(const Params& p, int64_t buffer_rows, const Rows& rows) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.states * p.head_dim));
  at::parallel_for(0, p.rows_outer * p.rows_inner, grain, [&](int64_t first, int64_t last) {
    std::vector<float> buffer(buffer_rows * p.head_dim);
    rows(first, last, buffer.data());
  });
}

std::tuple<at::Tensor, at::Tensor> attention_merge_cpu(at::TensorList o, at::TensorList lse) {
  return run_attention_merge(o, lse, [&](const std::vector<at::Tensor>& states, const std::vector<at::Tensor>& logs,
                                         const at::Tensor& out, const at::Tensor& out_lse) {
    dispatch_float_types(out.scalar_type(), [&](auto element) {
      using T = decltype(element);
      const AttentionMergeParams<T> p = attention_merge_params<T, T>(states, logs, out, out_lse);
      parallel_rows(p, std::is_same_v<T, float> ? 0 : 2,
                    [&](int64_t first, int64_t last, float* buffer) { merge_rows(&p, first, last, buffer); });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> attention_merge_backward_cpu(const at::Tensor& grad_out,
                                                                const std::optional<at::Tensor>& grad_lse,
                                                                at::TensorList o, at::TensorList lse) {
  return run_attention_merge_backward(
      grad_out, grad_lse, o, lse,
      [&](const at::Tensor& g, const at::Tensor& g_lse, const std::vector<at::Tensor>& states,
          const std::vector<at::Tensor>& logs, const at::Tensor& grad_o, const at::Tensor& grad_lse_states) {
        dispatch_float_types(grad_o.scalar_type(), [&](auto element) {
          using T = decltype(element);
          const AttentionMergeBackwardParams<T> p =
              attention_merge_backward_params<T, T>(g, g_lse, states, logs, grad_o, grad_lse_states);
          parallel_rows(p, std::is_same_v<T, float> ? 0 : 2, [&](int64_t first, int64_t last, float* buffer) {
            merge_backward_rows(&p, first, last, buffer);
          });
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("attention_merge", &attention_merge_cpu);
  m.impl("attention_merge_backward", &attention_merge_backward_cpu);
}

}  // namespace genfast
