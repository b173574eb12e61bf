// Appending new keys and values to a KV cache, the keys (and the queries) turned by a rotary
// embedding first: the first step of flash_attn_with_kvcache (genfast.reference.attention_kvcache).
//
// Row i of sequence n's new keys is key position p = cache_seqlens[n] + i. It goes to the cache row
// (block_table[n, p / page_size], p % page_size) of a paged cache, else (cache_batch_idx[n] or n, p).
// Query i of sequence n turns at position cache_seqlens[n] + i (queries_in_sequence), else at
// cache_seqlens[n]. The rotary embedding turns plane m < half of a head (features (2m, 2m + 1)
// interleaved, (m, m + half) otherwise) by the angle of cos[p, m] and sin[p, m], in float; features
// from 2 half on pass unchanged.
#pragma once

#include <stdint.h>

#include "host_device.h"
#include "rotary.h"

namespace genfast {

template <typename T>
struct KvcacheAppendParams {
  int64_t batch, new_rows, kv_heads, head_dim, v_dim;
  const T* k;  // (batch, new_rows, kv_heads, head_dim), contiguous
  const T* v;  // (batch, new_rows, kv_heads, v_dim), contiguous
  T* k_cache;  // rows (first, second, head) by the strides below; features contiguous
  T* v_cache;
  int64_t k_cache_strides[3], v_cache_strides[3];
  const int32_t* cache_seqlens;    // (batch,)
  const int32_t* cache_batch_idx;  // (batch,) or null
  const int32_t* block_table;      // (batch, table_width) or null: then page_size is the cache's row length
  int64_t table_width, page_size;
  const T* cos;  // (positions, half), contiguous, or null: no rotation
  const T* sin;
  int64_t half;
  int64_t table_rows;  // the tables' positions; one outside turns by nothing (a GPU does not check them)
  bool interleaved;
  const T* q;  // (batch, q_rows, q_heads, head_dim), contiguous, or null: no queries to turn
  T* q_out;    // likewise
  int64_t q_rows, q_heads;
  bool queries_in_sequence;
};

// The element offset of row `row` (of new_rows) of sequence n's new keys in a cache with `strides`.
template <typename T>
GF_HOST_DEVICE int64_t kvcache_row_offset(const KvcacheAppendParams<T>& p, int64_t n, int64_t row,
                                          const int64_t strides[3]) {
  const int64_t position = static_cast<int64_t>(p.cache_seqlens[n]) + row;
  if (p.block_table != nullptr) {
    const int64_t page = p.block_table[n * p.table_width + position / p.page_size];
    return page * strides[0] + (position % p.page_size) * strides[1];
  }
  const int64_t first = p.cache_batch_idx != nullptr ? static_cast<int64_t>(p.cache_batch_idx[n]) : n;
  return first * strides[0] + position * strides[1];
}

// The rotary position of query row `row` of sequence n.
template <typename T>
GF_HOST_DEVICE int64_t kvcache_query_position(const KvcacheAppendParams<T>& p, int64_t n, int64_t row) {
  return static_cast<int64_t>(p.cache_seqlens[n]) + (p.queries_in_sequence ? row : 0);
}

}  // namespace genfast
