// Checks and parameters of genfast::kvcache_append (kernels/common/kvcache_append.h), shared by its
// CPU and CUDA bindings: every error names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../kernels/common/kvcache_append.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kKvcacheAppendOp = "genfast.kvcache_append";

inline void check_index_vector(const std::optional<at::Tensor>& t, const char* name, int64_t batch,
                               const at::Tensor& like) {
  if (!t) return;
  TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) == batch, kKvcacheAppendOp, ": ", name,
              " must be an int32 tensor (batch,) = (", batch, ",), got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK(t->device() == like.device(), kKvcacheAppendOp, ": ", name, " must be on k's device (", like.device(),
              "), got ", t->device());
}

inline void check_kvcache_append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache_seqlens,
                                 const std::optional<at::Tensor>& cache_batch_idx,
                                 const std::optional<at::Tensor>& block_table,
                                 const std::optional<at::Tensor>& rotary_cos,
                                 const std::optional<at::Tensor>& rotary_sin, const std::optional<at::Tensor>& q,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const std::optional<at::Tensor>& q_out) {
  const char* op = kKvcacheAppendOp;
  check_floating_input(op, k, "k");
  TORCH_CHECK(k.dim() == 4, op, ": k must be (batch, seqlen_new, kv_heads, head_dim), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.sizes().slice(0, 3) == k.sizes().slice(0, 3), op,
              ": v must be (batch, seqlen_new, kv_heads, v_dim) with k's first three sizes ", k.sizes().slice(0, 3),
              ", got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == k.scalar_type() && v.device() == k.device(), op,
              ": v must have k's dtype and device (", k.scalar_type(), ", ", k.device(), "), got ", v.scalar_type(),
              ", ", v.device());
  for (const auto& [t, name, dim] : {std::tuple<const at::Tensor&, const char*, int64_t>{k_cache, "k_cache", k.size(3)},
                                     {v_cache, "v_cache", v.size(3)}}) {
    TORCH_CHECK(t.scalar_type() == k.scalar_type() && t.device() == k.device(), op, ": ", name,
                " must have k's dtype and device (", k.scalar_type(), ", ", k.device(), "), got ", t.scalar_type(),
                ", ", t.device());
    TORCH_CHECK(t.dim() == 4 && t.size(2) == k.size(2) && t.size(3) == dim && t.stride(3) == 1, op, ": ", name,
                " must be a cache (rows, row_length, kv_heads = ", k.size(2), ", ", dim,
                ") with contiguous features, got ", t.sizes(), " strides ", t.strides());
  }
  TORCH_CHECK(k_cache.sizes().slice(0, 2) == v_cache.sizes().slice(0, 2), op,
              ": k_cache and v_cache must have the same rows, got ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t batch = k.size(0);
  check_index_vector(cache_seqlens, "cache_seqlens", batch, k);
  check_index_vector(cache_batch_idx, "cache_batch_idx", batch, k);
  if (block_table) {
    TORCH_CHECK(!cache_batch_idx, op, ": cache_batch_idx indexes a padded cache; a paged cache has block_table");
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2 && block_table->size(0) == batch &&
                    block_table->device() == k.device(),
                op, ": block_table must be an int32 tensor (batch = ", batch,
                ", pages per sequence) on k's device, got ", block_table->scalar_type(), " ", block_table->sizes(),
                " on ", block_table->device());
  }
  TORCH_CHECK(rotary_cos.has_value() == rotary_sin.has_value(), op, ": rotary_cos and rotary_sin go together");
  if (rotary_cos) {
    TORCH_CHECK(rotary_cos->dim() == 2 && rotary_sin->sizes() == rotary_cos->sizes() &&
                    2 * rotary_cos->size(1) <= k.size(3),
                op, ": rotary_cos and rotary_sin must be (positions, rotary_dim / 2) with rotary_dim <= head_dim (",
                k.size(3), "), got ", rotary_cos->sizes(), " and ", rotary_sin->sizes());
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*rotary_cos, "rotary_cos"},
                                  {*rotary_sin, "rotary_sin"}}) {
      TORCH_CHECK(t.scalar_type() == k.scalar_type() && t.device() == k.device(), op, ": ", name,
                  " must have k's dtype and device (", k.scalar_type(), ", ", k.device(), "), got ", t.scalar_type(),
                  ", ", t.device());
    }
  }
  TORCH_CHECK(q.has_value() == q_out.has_value(), op, ": q and q_out go together");
  if (q) {
    TORCH_CHECK(rotary_cos.has_value(), op, ": q is turned by the rotary embedding: pass rotary_cos and rotary_sin");
    TORCH_CHECK(q->dim() == 4 && q->size(0) == batch && q->size(3) == k.size(3), op,
                ": q must be (batch = ", batch, ", seqlen_q, heads, head_dim = ", k.size(3), "), got ", q->sizes());
    check_like(op, *q, "q", *q_out, "q_out");
    TORCH_CHECK(q->scalar_type() == k.scalar_type(), op, ": q must have k's dtype (", k.scalar_type(), "), got ",
                q->scalar_type());
  }
}

// On the CPU, where reading them costs nothing: each sequence's new rows fit its cache rows and
// the rotary tables, and the cache rows and pages it names exist.
inline void check_kvcache_rows(const at::Tensor& k, const at::Tensor& cache_seqlens,
                               const std::optional<at::Tensor>& cache_batch_idx,
                               const std::optional<at::Tensor>& block_table,
                               const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& q,
                               bool queries_in_sequence, const at::Tensor& k_cache) {
  const char* op = kKvcacheAppendOp;
  const int64_t batch = k.size(0), new_rows = k.size(1), page_size = k_cache.size(1);
  const int64_t capacity = block_table ? block_table->size(1) * page_size : page_size;
  const int64_t turned = std::max(new_rows, q && queries_in_sequence ? q->size(1) : (q && q->size(1) > 0 ? 1 : 0));
  const at::Tensor seqlens = cache_seqlens.contiguous();
  const at::Tensor rows = cache_batch_idx ? cache_batch_idx->contiguous() : at::Tensor();
  const at::Tensor table = block_table ? block_table->contiguous() : at::Tensor();
  const int32_t* held = seqlens.const_data_ptr<int32_t>();
  for (int64_t n = 0; n < batch; ++n) {
    TORCH_CHECK_VALUE(held[n] >= 0 && held[n] + new_rows <= capacity, op, ": cache_seqlens[", n, "] + seqlen_new (",
                      held[n], " + ", new_rows, ") must lie in 0 .. ", capacity, ", the cache's keys per sequence");
    TORCH_CHECK_VALUE(!rotary_cos || held[n] + turned <= rotary_cos->size(0), op, ": rotary_cos and rotary_sin have ",
                      rotary_cos ? rotary_cos->size(0) : 0, " positions; sequence ", n,
                      " turns rows up to position ", held[n] + turned - 1);
    if (rows.defined()) {
      const int64_t row = rows.const_data_ptr<int32_t>()[n];
      TORCH_CHECK_VALUE(row >= 0 && row < k_cache.size(0), op, ": cache_batch_idx[", n, "] = ", row,
                        " must lie in 0 .. ", k_cache.size(0) - 1);
    }
    for (int64_t j = held[n] / page_size; table.defined() && new_rows > 0 && j <= (held[n] + new_rows - 1) / page_size;
         ++j) {
      const int64_t page = table.const_data_ptr<int32_t>()[n * table.size(1) + j];
      TORCH_CHECK_VALUE(page >= 0 && page < k_cache.size(0), op, ": block_table[", n, ", ", j, "] = ", page,
                        " must lie in 0 .. ", k_cache.size(0) - 1);
    }
  }
}

// The kernels' parameters; k, v, q and the tables made contiguous into `keep` (alive while they run).
template <typename T, typename Storage>
KvcacheAppendParams<T> kvcache_append_params(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache_seqlens,
                                             const std::optional<at::Tensor>& cache_batch_idx,
                                             const std::optional<at::Tensor>& block_table,
                                             const std::optional<at::Tensor>& rotary_cos,
                                             const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                                             const std::optional<at::Tensor>& q, bool queries_in_sequence,
                                             const at::Tensor& k_cache, const at::Tensor& v_cache,
                                             const at::Tensor& q_out, std::vector<at::Tensor>& keep) {
  keep.reserve(keep.size() + 8);  // no reallocation while the references below are read
  auto held = [&](const at::Tensor& t) -> const at::Tensor& { return keep.emplace_back(t.contiguous()); };
  KvcacheAppendParams<T> p{};
  p.batch = k.size(0);
  p.new_rows = k.size(1);
  p.kv_heads = k.size(2);
  p.head_dim = k.size(3);
  p.v_dim = v.size(3);
  p.k = input_ptr<T, Storage>(held(k));
  p.v = input_ptr<T, Storage>(held(v));
  p.k_cache = output_ptr<T, Storage>(k_cache);
  p.v_cache = output_ptr<T, Storage>(v_cache);
  for (int d = 0; d < 3; ++d) {
    p.k_cache_strides[d] = k_cache.stride(d);
    p.v_cache_strides[d] = v_cache.stride(d);
  }
  p.cache_seqlens = held(cache_seqlens).template const_data_ptr<int32_t>();
  p.cache_batch_idx = cache_batch_idx ? held(*cache_batch_idx).template const_data_ptr<int32_t>() : nullptr;
  p.block_table = block_table ? held(*block_table).template const_data_ptr<int32_t>() : nullptr;
  p.table_width = block_table ? block_table->size(1) : 0;
  p.page_size = k_cache.size(1);
  p.cos = rotary_cos ? input_ptr<T, Storage>(held(*rotary_cos)) : nullptr;
  p.sin = rotary_sin ? input_ptr<T, Storage>(held(*rotary_sin)) : nullptr;
  p.half = rotary_cos ? rotary_cos->size(1) : 0;
  p.table_rows = rotary_cos ? rotary_cos->size(0) : 0;
  p.interleaved = rotary_interleaved;
  p.q = q ? input_ptr<T, Storage>(held(*q)) : nullptr;
  p.q_out = q ? output_ptr<T, Storage>(q_out) : nullptr;
  p.q_rows = q ? q->size(1) : 0;
  p.q_heads = q ? q->size(2) : 0;
  p.queries_in_sequence = queries_in_sequence;
  return p;
}

}  // namespace genfast
