// genfast::attention_merge and its backward on the CPU: rows in parallel, each row's states summed
// into a float32 row in loops the compiler vectorizes (float16 and bfloat16 rows widened and narrowed
// sixteen elements at a time, float16_rows.h). A state of lse -inf has no keys and is not read.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../attention_merge_args.h"
#include "cpu_vectors.h"
#include "float16_rows.h"
#include "streaming_store.h"

namespace genfast {
namespace {

constexpr float kNoKeys = -__builtin_inff();
// Rows whose weights are computed together, in vector loops. With 16, the loads of each block's
// rows waited on its weights' chains of exponentials: two float32 states of 4096 x 32 x 128 merged
// with plain stores took 17.4 ms on one thread of an Intel Xeon, 16.2 with 128.
constexpr int64_t kRowBlock = 128;

// A block of up to kRowBlock rows: each row's state 0 o and lse, its merged lse, and the states'
// weights a_s (weights[s * kRowBlock + j], 0 for a state without keys), whose exponentials and
// logarithms (elementary_math.h's polynomials) are computed in vector loops across the rows.
template <typename T>
struct RowBlock {
  const T* o[kRowBlock];
  const float* lse[kRowBlock];
  float merged[kRowBlock];
  float* weights;  // states x kRowBlock
  int64_t n;

  // The weights are first each state's lse of the block's rows, gathered (rows past n: -inf), so
  // that the loops below run over a whole block of contiguous floats, in vectors. They had come out
  // of g++ as scalar code, exponentials and logarithms one row at a time, because they read
  // p.ln_base, which their stores might overwrite for all it knew: a merge of two float32 states
  // (8192 rows of 128, one thread, an Intel Xeon) took 0.85 ms, 0.60 ms in vectors.
  template <typename Params>
  GF_CPU_INLINE void load(const Params& p, int64_t first, int64_t last) {
    n = std::min(kRowBlock, last - first);
    const float ln_base = p.ln_base;
    float most[kRowBlock], total[kRowBlock];
    int64_t outer = first / p.rows_inner, inner = first % p.rows_inner;
    for (int64_t j = 0; j < n; ++j) {
      o[j] = p.o + outer * p.o_strides[0] + inner * p.o_strides[1];
      lse[j] = p.lse + outer * p.lse_strides[0] + inner * p.lse_strides[1];
      if (++inner == p.rows_inner) {
        inner = 0;
        ++outer;
      }
    }
    for (int64_t s = 0; s < p.states; ++s) {
      const int64_t at = attention_merge_state_at(p.lse_states, s);
      float* row_lse = weights + s * kRowBlock;
      for (int64_t j = 0; j < n; ++j) row_lse[j] = lse[j][at];
      for (int64_t j = n; j < kRowBlock; ++j) row_lse[j] = kNoKeys;
    }
#pragma omp simd
    for (int64_t j = 0; j < kRowBlock; ++j) {
      most[j] = kNoKeys;
      total[j] = 0.0f;
    }
    for (int64_t s = 0; s < p.states; ++s) {
      const float* row_lse = weights + s * kRowBlock;
#pragma omp simd
      for (int64_t j = 0; j < kRowBlock; ++j) most[j] = attention_merge_max(most[j], row_lse[j]);
    }
    for (int64_t s = 0; s < p.states; ++s) {
      float* row = weights + s * kRowBlock;  // lse, then b^(lse - most)
#pragma omp simd
      for (int64_t j = 0; j < kRowBlock; ++j) {
        row[j] = most[j] == kNoKeys ? 0.0f : attention_merge_pow(row[j] - most[j], ln_base);
        total[j] += row[j];
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < kRowBlock; ++j) {
      merged[j] = most[j] == kNoKeys ? kNoKeys : most[j] + attention_merge_log(total[j], ln_base);
    }
    for (int64_t s = 0; s < p.states; ++s) {
      float* row = weights + s * kRowBlock;
#pragma omp simd
      for (int64_t j = 0; j < kRowBlock; ++j) {
        row[j] = most[j] == kNoKeys ? 0.0f : attention_merge_share_weight(row[j], total[j]);
      }
    }
  }

  // Whether row j's state s has no keys (then it is not read).
  template <typename Params>
  GF_CPU_INLINE bool empty(const Params& p, int64_t j, int64_t s) const {
    return lse[j][attention_merge_state_at(p.lse_states, s)] == kNoKeys;
  }
};

// Row j of a block (row r), float32, head_dim a multiple of 16, plain stores, at most kListed states:
// sixteen features at a time summed over the states in registers and stored, rather than summed in
// an L1 buffer and copied. The row's live states and weights are gathered into locals first, rather
// than read from p and rows at every sixteen features (which the stores might overwrite, as far as
// the compiler knows): two float32 states of 4096 x 32 x 128 merged into a new output had taken
// 25.5 ms on one thread of an Intel Xeon against 20.3 for ATen's add, 23.5 against 21 since.
template <CpuCapability isa>
GF_CPU_INLINE void merge_row_in_registers(const AttentionMergeParams<float>& p, const RowBlock<float>& rows, int64_t j,
                                          int64_t r) {
  constexpr int W = kVectorLanes<isa>;
  const float* src[AttentionMergeStates::kListed];
  float weight[AttentionMergeStates::kListed];
  int live = 0;
  for (int64_t s = 0; s < p.states; ++s) {
    if (rows.empty(p, j, s)) continue;
    src[live] = rows.o[j] + attention_merge_state_at(p.o_states, s);
    weight[live] = rows.weights[s * kRowBlock + j];
    ++live;
  }
  const int64_t dim = p.head_dim;
  p.out_lse[attention_merge_row_offset(p.out_lse_strides, p.rows_inner, r)] = rows.merged[j];
  if (dim == 0) return;  // an empty out's pointer may be null
  float* out = p.out + attention_merge_row_offset(p.out_strides, p.rows_inner, r);
  if (live == 0) {  // no keys in any state
    std::fill(out, out + dim, 0.0f);
    return;
  }
  // The sum starts from the first state's product: g++ built a zero start lane by lane, in sixteen
  // masked moves per sixteen features.
  for (int64_t c = 0; c < dim; c += kCols) {
    Floats16<W> sum = weight[0] * load16<W>(src[0] + c);
    for (int k = 1; k < live; ++k) sum += weight[k] * load16<W>(src[k] + c);
    store16<W>(out + c, sum);  // after the row's states are read at c: out may be one of them (in place)
  }
}

// Rows first .. last; buffer holds 2 head_dim floats and states x kRowBlock. Each row is summed in
// registers (merge_row_in_registers), or in the buffer (in L1) and stored once, float32 rows with
// streaming stores where `stream`.
template <CpuCapability isa, typename T>
GF_CPU_INLINE void merge_rows_for(const AttentionMergeParams<T>* params, int64_t first, int64_t last, float* buffer,
                                  bool stream) {
  const AttentionMergeParams<T>& p = *params;
  const int64_t dim = p.head_dim;
  float* sum = buffer;
  float* row = buffer + dim;
  RowBlock<T> rows;
  rows.weights = buffer + 2 * dim;
  for (int64_t block = first; block < last; block += kRowBlock) {
    rows.load(p, block, last);
    for (int64_t j = 0; j < rows.n; ++j) {
      const int64_t r = block + j;
      if constexpr (std::is_same_v<T, float>) {
        if (!stream && dim % kCols == 0 && p.states <= AttentionMergeStates::kListed) {
          merge_row_in_registers<isa>(p, rows, j, r);
          continue;
        }
      }
      bool first_state = true;
      for (int64_t s = 0; s < p.states; ++s) {
        if (rows.empty(p, j, s)) continue;
        const float weight = rows.weights[s * kRowBlock + j];
        const float* o_s = nullptr;
        if constexpr (std::is_same_v<T, float>) {
          o_s = rows.o[j] + attention_merge_state_at(p.o_states, s);
        } else {
          widen<isa>(rows.o[j] + attention_merge_state_at(p.o_states, s), row, dim);
          o_s = row;
        }
        if (first_state) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) sum[c] = weight * o_s[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) sum[c] += weight * o_s[c];
        }
        first_state = false;
      }
      if (first_state) std::fill(sum, sum + dim, 0.0f);  // no keys in any state
      // Written after the row's states are read: out may be one of them (a merge in place).
      T* out = p.out + attention_merge_row_offset(p.out_strides, p.rows_inner, r);
      if constexpr (std::is_same_v<T, float>) {
        if (stream) {
          streaming_store(out, sum, dim);
        } else if (dim != 0) {  // an empty out's pointer may be null
          std::memcpy(out, sum, sizeof(float) * dim);
        }
      } else {
        narrow<isa>(sum, out, dim);
      }
      p.out_lse[attention_merge_row_offset(p.out_lse_strides, p.rows_inner, r)] = rows.merged[j];
    }
  }
}
GF_CPU_DISPATCH(merge_rows)

// Rows first .. last of the backward; buffer holds 2 head_dim floats and states x kRowBlock. d_s
// waits in grad_lse_states until the row's sum over its states is known.
template <CpuCapability isa, typename T>
GF_CPU_INLINE void merge_backward_rows_for(const AttentionMergeBackwardParams<T>* params, int64_t first, int64_t last,
                                           float* buffer) {
  const AttentionMergeBackwardParams<T>& p = *params;
  constexpr bool kFloat = std::is_same_v<T, float>;
  const int64_t dim = p.head_dim, count = p.rows_outer * p.rows_inner;
  RowBlock<T> rows;
  rows.weights = buffer + 2 * dim;
  for (int64_t block = first; block < last; block += kRowBlock) {
    rows.load(p, block, last);
    for (int64_t j = 0; j < rows.n; ++j) {
      const int64_t r = block + j;
      const float* g = nullptr;
      if constexpr (kFloat) {
        g = p.grad_out + r * dim;
      } else {
        widen<isa>(p.grad_out + r * dim, buffer, dim);
        g = buffer;
      }
      float mean = 0.0f;
      for (int64_t s = 0; s < p.states; ++s) {
        const bool empty = rows.empty(p, j, s);
        const float weight = rows.weights[s * kRowBlock + j];
        float dot = 0.0f;
        if (!empty) {
          const float* o_s = nullptr;
          if constexpr (kFloat) {
            o_s = rows.o[j] + attention_merge_state_at(p.o_states, s);
          } else {
            widen<isa>(rows.o[j] + attention_merge_state_at(p.o_states, s), buffer + dim, dim);
            o_s = buffer + dim;
          }
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < dim; ++c) dot += g[c] * o_s[c];
        }
        T* grad_o = p.grad_o + (s * count + r) * dim;
        float* scaled = buffer + dim;
        if constexpr (kFloat) scaled = grad_o;
        if (empty) {
          std::fill(scaled, scaled + dim, 0.0f);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) scaled[c] = weight * g[c];
        }
        if constexpr (!kFloat) narrow<isa>(scaled, grad_o, dim);
        p.grad_lse_states[s * count + r] = dot;
        mean += weight * dot;
      }
      const float grad_lse = p.grad_lse == nullptr ? 0.0f : p.grad_lse[r];
      for (int64_t s = 0; s < p.states; ++s) {
        float& out = p.grad_lse_states[s * count + r];
        out = rows.empty(p, j, s)
                  ? 0.0f
                  : attention_merge_lse_grad(rows.weights[s * kRowBlock + j], out, mean, grad_lse, p.ln_base);
      }
    }
  }
}
GF_CPU_DISPATCH(merge_backward_rows)

// Rows in parallel, about 32K elements of o a task, each task's buffer 2 head_dim floats and the
// weights of a block of rows. rows(first, last, buffer, stream); each task fences its streaming
// stores where `stream`.
template <typename Params, typename Rows>
void parallel_rows(const Params& p, bool stream, const Rows& rows) {
  const int64_t grain = std::max<int64_t>(kRowBlock, 32768 / std::max<int64_t>(1, p.states * p.head_dim));
  at::parallel_for(0, p.rows_outer * p.rows_inner, grain, [&](int64_t first, int64_t last) {
    std::vector<float> buffer(2 * p.head_dim + p.states * kRowBlock);
    rows(first, last, buffer.data(), stream);
    if (stream) streaming_store_fence();
  });
}

// Streaming stores where the float32 output outgrows the caches and its pages are resident
// (pages_resident). On an Intel Xeon (2 threads, two float32 states of tokens x 32 x 128 merged
// into a given output written before) they took 1.04 ms against 0.97 at 1024 tokens (a 16 MiB
// output), 2.05 against 2.3 at 2048 and 5.5 against 7.5 at 4096. An out= that overlaps the states
// is merged into a new tensor first, so the merge never streams over lines it reads.
template <typename T, typename Params>
bool merge_streams(const Params& p, const at::Tensor& out) {
  const int64_t bytes = p.rows_outer * p.rows_inner * p.head_dim * int64_t{sizeof(float)};
  return std::is_same_v<T, float> && worth_streaming(out.const_data_ptr(), bytes);
}

void merge_on_cpu(const std::vector<at::Tensor>& states, const std::vector<at::Tensor>& logs, double ln_base,
                  const at::Tensor& out, const at::Tensor& out_lse) {
  dispatch_float_types(out.scalar_type(), [&](auto element) {
    using T = decltype(element);
    const AttentionMergeParams<T> p = attention_merge_params<T, T>(states, logs, ln_base, out, out_lse);
    parallel_rows(p, merge_streams<T>(p, out), [&](int64_t first, int64_t last, float* buffer, bool stream) {
      merge_rows(&p, first, last, buffer, stream);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> attention_merge_cpu(at::TensorList o, at::TensorList lse, double ln_base) {
  return run_attention_merge(o, lse, ln_base, [&](const auto& states, const auto& logs, const auto& out,
                                                  const auto& out_lse) {
    merge_on_cpu(states, logs, ln_base, out, out_lse);
  });
}

void attention_merge_out_cpu(at::TensorList o, at::TensorList lse, double ln_base, const at::Tensor& out,
                             const at::Tensor& out_lse) {
  run_attention_merge_out(o, lse, ln_base, out, out_lse, [&](const auto& states, const auto& logs,
                                                             const auto& into, const auto& into_lse) {
    merge_on_cpu(states, logs, ln_base, into, into_lse);
  });
}

std::tuple<at::Tensor, at::Tensor> attention_merge_backward_cpu(const at::Tensor& grad_out,
                                                                const std::optional<at::Tensor>& grad_lse,
                                                                at::TensorList o, at::TensorList lse,
                                                                double ln_base) {
  return run_attention_merge_backward(
      grad_out, grad_lse, o, lse, ln_base,
      [&](const at::Tensor& g, const at::Tensor& g_lse, const std::vector<at::Tensor>& states,
          const std::vector<at::Tensor>& logs, const at::Tensor& grad_o, const at::Tensor& grad_lse_states) {
        dispatch_float_types(grad_o.scalar_type(), [&](auto element) {
          using T = decltype(element);
          const AttentionMergeBackwardParams<T> p =
              attention_merge_backward_params<T, T>(g, g_lse, states, logs, ln_base, grad_o, grad_lse_states);
          parallel_rows(p, false, [&](int64_t first, int64_t last, float* buffer, bool) {
            merge_backward_rows(&p, first, last, buffer);
          });
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("attention_merge", &attention_merge_cpu);
  m.impl("attention_merge_out", &attention_merge_out_cpu);
  m.impl("attention_merge_backward", &attention_merge_backward_cpu);
}

}  // namespace genfast
