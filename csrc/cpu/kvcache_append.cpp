// genfast::kvcache_append on the CPU: one task per new row (its keys turned and written, its values
// written) and per query row (turned), in parallel over rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kvcache_append_args.h"
#include "rotary_row.h"

namespace genfast {
namespace {

// Rows (heads, head_dim) at x turned at `position` into out, whose heads are out_head_stride apart;
// copied where there are no rotary tables. Compiled per instruction set (rotary_row.h).
template <CpuCapability isa, bool Interleaved, typename T>
GF_CPU_INLINE void turn_heads_for(const KvcacheAppendParams<T>* params, const T* x, int64_t heads, int64_t position,
                                  T* out, int64_t out_head_stride, float* buffer) {
  const KvcacheAppendParams<T>& p = *params;
  const int64_t half = p.cos != nullptr ? p.half : 0;
  const T* cos = p.cos != nullptr ? p.cos + position * half : nullptr;
  const T* sin = p.sin != nullptr ? p.sin + position * half : nullptr;
  for (int64_t h = 0; h < heads; ++h) {
    turn_head_row<isa, Interleaved>(x + h * p.head_dim, out + h * out_head_stride, cos, sin, half, p.head_dim,
                                    false, true, buffer);
  }
}
GF_CPU_DISPATCH(turn_heads)

template <typename T>
void turn_row_heads(const KvcacheAppendParams<T>& p, const T* x, int64_t heads, int64_t position, T* out,
                    int64_t out_head_stride, float* buffer) {
  if (p.interleaved) {
    turn_heads<true>(&p, x, heads, position, out, out_head_stride, buffer);
  } else {
    turn_heads<false>(&p, x, heads, position, out, out_head_stride, buffer);
  }
}

template <typename T>
void kvcache_append_rows(const KvcacheAppendParams<T>& p) {
  const int64_t key_rows = p.batch * p.new_rows, query_rows = p.q != nullptr ? p.batch * p.q_rows : 0;
  const int64_t row_work = std::max<int64_t>(1, std::max(p.kv_heads * (p.head_dim + p.v_dim), p.q_heads * p.head_dim));
  at::parallel_for(0, key_rows + query_rows, std::max<int64_t>(1, 32768 / row_work), [&](int64_t first, int64_t last) {
    std::vector<float> buffer(std::is_same_v<T, float> || p.cos == nullptr ? 0 : 4 * p.half);
    for (int64_t task = first; task < last; ++task) {
      if (task < key_rows) {
        const int64_t n = task / p.new_rows, row = task % p.new_rows;
        const int64_t position = static_cast<int64_t>(p.cache_seqlens[n]) + row;
        turn_row_heads(p, p.k + task * p.kv_heads * p.head_dim, p.kv_heads, position,
                       p.k_cache + kvcache_row_offset(p, n, row, p.k_cache_strides), p.k_cache_strides[2],
                       buffer.data());
        T* values = p.v_cache + kvcache_row_offset(p, n, row, p.v_cache_strides);
        for (int64_t h = 0; h < p.kv_heads; ++h) {
          std::memcpy(values + h * p.v_cache_strides[2], p.v + (task * p.kv_heads + h) * p.v_dim, sizeof(T) * p.v_dim);
        }
      } else {
        const int64_t q_task = task - key_rows, n = q_task / p.q_rows, row = q_task % p.q_rows;
        const int64_t offset = q_task * p.q_heads * p.head_dim;
        turn_row_heads(p, p.q + offset, p.q_heads, kvcache_query_position(p, n, row), p.q_out + offset,
                       p.head_dim, buffer.data());
      }
    }
  });
}

void kvcache_append_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache_seqlens,
                        const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& block_table,
                        const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
                        bool rotary_interleaved, const std::optional<at::Tensor>& q, bool queries_in_sequence,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& q_out) {
  check_kvcache_append(k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin, q, k_cache, v_cache,
                       q_out);
  check_kvcache_rows(k, cache_seqlens, cache_batch_idx, block_table, rotary_cos, q, queries_in_sequence, k_cache);
  const at::Tensor q_dst = contiguous_output_if(q_out);
  std::vector<at::Tensor> keep;
  auto run = [&](auto element) {
    using T = decltype(element);
    kvcache_append_rows(kvcache_append_params<T, T>(k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos,
                                                    rotary_sin, rotary_interleaved, q, queries_in_sequence, k_cache,
                                                    v_cache, q_dst, keep));
  };
  dispatch_float_types(k.scalar_type(), run);
  copy_back_if_buffered(q_dst, q_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("kvcache_append", &kvcache_append_cpu); }

}  // namespace genfast
