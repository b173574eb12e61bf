// Scaled-dot-product attention (genfast/reference/attention.py): per batch b and query head h,
// with kv head h / (heads / kv_heads),
//   s_ij = scale q_i . k_j (or scale (q_i . k_j + qv_i . v_j): qv);  s = softcap tanh(s / softcap);
//   s -= slope_h |i + Lk - Lq - j|;
//   s += bias_ij or s = -inf where a bool mask is false;  s = -inf unless i + band_lo <= j <= i + band_hi;
//   o_i = sum_j dropout(softmax(s_i))_j v_j;  lse_i = logsumexp_j s_ij
// A row masking every key gives o = 0 and lse = -inf. With attention sinks (sinks, one logit per query
// head) sink_h joins each row's logsumexp as a score without a value: lse_i = log(e^sink_h +
// sum_j e^s_ij) and o_i = sum_j dropout(e^(s_ij - lse_i))_j v_j (attention_lse_with_sink). Dropout keeps element
// ((b heads + h) Lq + i) Lk + j where its Philox uniform is >= dropout_p, scaled by 1/(1 - p).
//
// Packed variable-length batches (flash_attn_varlen_func's layout, genfast.reference.attention.
// varlen_attention): with cu_seqlens_q and cu_seqlens_k set, sequence b is q rows
// cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q (total_q, heads, dim) and k, v rows cu_seqlens_k[b] ..;
// q_len and k_len are the longest sequences' lengths, the batch strides are 0, band_lo and band_hi
// are relative to each sequence's bottom-right diagonal (j - i = Lk_b - Lq_b), there is no mask, lse
// is (heads, total_q) and dropout keeps element (h total_q + cu_seqlens_q[b] + i) total_k +
// cu_seqlens_k[b] + j. With seqused_k (FlashAttention 3's), sequence b has its first seqused_k[b]
// keys of those rows alone: a padded KV cache, row b at cu_seqlens_k[b] = b max_len, holding
// seqused_k[b] keys so far. With a block table (a paged KV cache, as vLLM and FlashAttention's
// block_table lay it out) k and v are pages (pages, page_size, kv_heads, dim): key j of sequence b is
// row j % page_size of page block_table[b][j / page_size], and cu_seqlens_k gives the lengths alone.
// Any page size: a key block that crosses pages is read row by row (attention_block_in_one_page).
#pragma once

#include <stdint.h>

#include "elementary_math.h"
#include "float16_bits.h"
#include "host_device.h"
#include "philox.h"

namespace genfast {

enum class AttentionMask : int32_t { kNone = 0, kBool = 1, kAdditive = 2 };
enum class AttentionBias : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };  // an additive mask's dtype

constexpr int64_t kAttentionUnbounded = int64_t(1) << 62;  // band_lo = -this or band_hi = this: no bound

// Inputs float32 with the head dimension contiguous; strides in elements for (b, h, position).
struct AttentionParams {
  int64_t batch, heads, kv_heads, q_len, k_len, dim, v_dim;
  const int32_t* cu_seqlens_q;  // (batch + 1), or null: dense (batch, heads, length, dim) inputs
  const int32_t* cu_seqlens_k;
  const int32_t* seqused_k;     // (batch), or null: each sequence's keys up to cu_seqlens_k[b + 1]
  int64_t total_q, total_k;     // varlen: the packed row counts
  const int32_t* block_table;   // (batch, block_table_stride), or null: k and v not paged
  int64_t block_table_stride, page_size;
  const float* q;
  int64_t q_stride[3];
  const float* k;
  int64_t k_stride[3];  // paged: (page, head, position within the page)
  const float* v;
  int64_t v_stride[3];
  AttentionMask mask_kind;
  const void* mask;        // uint8 (bool) or bias_type, read at b, h, i, j with mask_stride (0: broadcast)
  int64_t mask_stride[4];
  AttentionBias bias_type;  // of an additive mask
  const float* alibi_slopes;  // (heads) or (batch, heads), or null
  int64_t alibi_batch_stride;
  const float* sinks;         // (heads), or null: no attention sink
  const float* qv;            // q's layout with v_dim, or null: the scores are scale (q k^T + qv v^T)
  int64_t qv_stride[3];
  float scale, softcap;  // softcap 0: none
  int64_t band_lo, band_hi;
  float dropout_p;
  PhiloxKeyRef key;
  float* o;    // (batch, heads, q_len, v_dim), varlen (total_q, heads, v_dim); contiguous
  float* lse;  // (batch, heads, q_len), varlen (heads, total_q)
};

// Where sequence b lies. Query i of head h is row (q_start + i) of the packed positions; its output
// row (o, and grad_q, grad_o, in rows of v_dim or dim) is out_row(h, i), its lse and dropout row
// lse_row(h, i) (of row_length dropout columns, key j at column col0 + j).
struct AttentionSequence {
  int64_t q_start, k_start, q_len, k_len, band_lo, band_hi;
  int64_t row0, head_rows, row_length, col0;  // lse_row(h, i) = row0 + h head_rows + i
  int64_t out_head, out_position;             // out_row(h, i) = out0 + h out_head + i out_position
  int64_t out0, key_out0, key_out_head, key_out_position;  // grad_k, grad_v rows: the same for keys
  GF_HOST_DEVICE_INLINE int64_t lse_row(int64_t h, int64_t i) const { return row0 + h * head_rows + i; }
  GF_HOST_DEVICE_INLINE int64_t out_row(int64_t h, int64_t i) const { return out0 + h * out_head + i * out_position; }
  GF_HOST_DEVICE_INLINE int64_t key_out_row(int64_t hk, int64_t j) const {
    return key_out0 + hk * key_out_head + j * key_out_position;
  }
};

GF_HOST_DEVICE_INLINE AttentionSequence attention_sequence(const AttentionParams& p, int64_t b) {
  AttentionSequence s{};
  if (p.cu_seqlens_q == nullptr) {
    s.q_len = p.q_len;
    s.k_len = p.k_len;
    s.band_lo = p.band_lo;
    s.band_hi = p.band_hi;
    s.row0 = b * p.heads * p.q_len;
    s.head_rows = p.q_len;
    s.row_length = p.k_len;
    s.out0 = s.row0;
    s.out_head = p.q_len;
    s.out_position = 1;
    s.key_out0 = b * p.kv_heads * p.k_len;
    s.key_out_head = p.k_len;
    s.key_out_position = 1;
    return s;
  }
  s.q_start = p.cu_seqlens_q[b];
  s.k_start = p.cu_seqlens_k[b];
  s.q_len = p.cu_seqlens_q[b + 1] - s.q_start;
  s.k_len = p.seqused_k != nullptr ? p.seqused_k[b] : p.cu_seqlens_k[b + 1] - s.k_start;
  const int64_t shift = s.k_len - s.q_len;
  s.band_lo = p.band_lo <= -kAttentionUnbounded ? p.band_lo : p.band_lo + shift;
  s.band_hi = p.band_hi >= kAttentionUnbounded ? p.band_hi : p.band_hi + shift;
  s.row0 = s.q_start;
  s.head_rows = p.total_q;
  s.row_length = p.total_k;
  s.col0 = s.k_start;
  s.out0 = s.q_start * p.heads;
  s.out_head = 1;
  s.out_position = p.heads;
  s.key_out0 = s.k_start * p.kv_heads;
  s.key_out_head = 1;
  s.key_out_position = p.kv_heads;
  return s;
}

// The rows of lse: (batch, heads, q_len), or (heads, total_q) when packed.
GF_HOST_DEVICE_INLINE int64_t attention_lse_rows(const AttentionParams& p) {
  return p.cu_seqlens_q == nullptr ? p.batch * p.heads * p.q_len : p.heads * p.total_q;
}

// The element offsets of sequence b's query i, head h in q and qv (and of key j, kv head hk in k, v).
GF_HOST_DEVICE_INLINE int64_t attention_q_at(const AttentionParams& p, const AttentionSequence& s, int64_t b,
                                             int64_t h, int64_t i) {
  return b * p.q_stride[0] + h * p.q_stride[1] + (s.q_start + i) * p.q_stride[2];
}
GF_HOST_DEVICE_INLINE int64_t attention_qv_at(const AttentionParams& p, const AttentionSequence& s, int64_t b,
                                              int64_t h, int64_t i) {
  return b * p.qv_stride[0] + h * p.qv_stride[1] + (s.q_start + i) * p.qv_stride[2];
}
// Where key j of a paged sequence lies, head 0's, in a tensor of strides `stride`: `pages` is the
// sequence's row of the block table. In 32 bits (j and page_size are below 2^31, which the host
// checks): the CUDA kernels look up a page per row of a block that crosses pages, where a 64-bit
// division would cost several times as much.
GF_HOST_DEVICE_INLINE int64_t attention_paged_key_at(const AttentionParams& p, const int32_t* pages, int64_t j,
                                                     const int64_t (&stride)[3]) {
  const uint32_t key = static_cast<uint32_t>(j), size = static_cast<uint32_t>(p.page_size);
  return pages[key / size] * stride[0] + static_cast<int64_t>(key % size) * stride[2];
}
// Whether keys j .. j + n - 1 (n > 0) lie in one page (always when not paged): then a kernel may
// read them `stride[2]` apart from the first, else it looks up each key's page. In 32 bits, as
// attention_paged_key_at.
GF_HOST_DEVICE_INLINE bool attention_block_in_one_page(const AttentionParams& p, int64_t j, int64_t n) {
  const uint32_t first = static_cast<uint32_t>(j), last = static_cast<uint32_t>(j + n - 1);
  const uint32_t size = static_cast<uint32_t>(p.page_size);
  return p.block_table == nullptr || first / size == last / size;
}
GF_HOST_DEVICE_INLINE int64_t attention_key_at(const AttentionParams& p, const AttentionSequence& s, int64_t b,
                                               int64_t hk, int64_t j, const int64_t (&stride)[3]) {
  if (p.block_table != nullptr) {
    return hk * stride[1] + attention_paged_key_at(p, p.block_table + b * p.block_table_stride, j, stride);
  }
  return b * stride[0] + hk * stride[1] + (s.k_start + j) * stride[2];
}
GF_HOST_DEVICE_INLINE int64_t attention_k_at(const AttentionParams& p, const AttentionSequence& s, int64_t b,
                                             int64_t hk, int64_t j) {
  return attention_key_at(p, s, b, hk, j, p.k_stride);
}
GF_HOST_DEVICE_INLINE int64_t attention_v_at(const AttentionParams& p, const AttentionSequence& s, int64_t b,
                                             int64_t hk, int64_t j) {
  return attention_key_at(p, s, b, hk, j, p.v_stride);
}

// A row's log-sum-exp once its sink's logit joins it: log(e^lse + e^sink), -inf only when both are,
// NaN when either is. The kernels keep lse without the sink until a row (or its splits) is done,
// then scale o by e^(lse - lse_with_sink).
GF_HOST_DEVICE_INLINE float attention_lse_with_sink(float lse, float sink) {
  if (lse != lse || sink != sink) return lse + sink;
  const float high = lse > sink ? lse : sink, low = lse > sink ? sink : lse;
  if (high == -__builtin_inff()) return high;
  return high + log1p_f32(exp_nonpositive(low - high));
}

// softcap * tanh(s / softcap); t gets the tanh, whose 1 - t^2 is the cap's slope.
GF_HOST_DEVICE_INLINE float soft_capped(float s, float softcap, float& t) {
  t = tanh_f32(s / softcap);
  return softcap * t;
}

// ALiBi's bias, slope * |distance|, distance = i + (Lk - Lq) - j between query i and key j (the
// CPU kernel's rows pass int32 distances, which vectorize).
template <typename Distance>
GF_HOST_DEVICE_INLINE float alibi_bias(float slope, Distance distance) {
  return slope * static_cast<float>(distance < 0 ? -distance : distance);
}

// Element `at` of an additive mask as 32 bits: float32's own, or a 16-bit value's in the high half
// (then bfloat16's are float32's). Branch-free: the kernels read a block's mask in unrolled loops,
// where a branch per element costs compile time.
GF_HOST_DEVICE_INLINE uint32_t attention_bias_bits(const AttentionParams& p, int64_t at) {
  return p.bias_type == AttentionBias::kFloat32 ? static_cast<const uint32_t*>(p.mask)[at]
                                                : static_cast<uint32_t>(static_cast<const uint16_t*>(p.mask)[at]) << 16;
}

// Element `at` of an additive mask, as float32.
GF_HOST_DEVICE_INLINE float attention_bias_at(const AttentionParams& p, int64_t at) {
  const uint32_t bits = attention_bias_bits(p, at);
  return p.bias_type == AttentionBias::kFloat16 ? float16_bits_value(static_cast<uint16_t>(bits >> 16))
                                                 : bits_float(bits);
}

// Whether element `at` of the mask hides its key: false in a bool mask, -inf in an additive one (NaN
// does not hide), compared as bits (-inf has one encoding).
GF_HOST_DEVICE_INLINE bool attention_mask_hides(const AttentionParams& p, int64_t at) {
  if (p.mask_kind == AttentionMask::kBool) return static_cast<const uint8_t*>(p.mask)[at] == 0;
  return attention_bias_bits(p, at) == (p.bias_type == AttentionBias::kFloat16 ? 0xFC000000u : 0xFF800000u);
}

// Where the mask's row (b, h, i) starts: element j of it is at mask_row + j * mask_stride[3].
GF_HOST_DEVICE_INLINE int64_t attention_mask_row(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2];
}

// attention_score with the mask's row given (attention_mask_row(p, b, h, i)), which a kernel walking
// a row forms once, and the band tested only when test_band (a caller that knows (i, j) inside it
// skips the test). Without read_mask the mask is left to the caller (a kernel that staged it).
GF_HOST_DEVICE_INLINE float attention_score_in_row(const AttentionParams& p, const AttentionSequence& seq,
                                                   float scaled_dot, int64_t b, int64_t h, int64_t i, int64_t j,
                                                   int64_t mask_row, bool test_band, bool read_mask = true) {
  float t;
  float s = p.softcap > 0.0f ? soft_capped(scaled_dot, p.softcap, t) : scaled_dot;
  if (p.alibi_slopes != nullptr) {
    s -= alibi_bias(p.alibi_slopes[b * p.alibi_batch_stride + h], i + (seq.k_len - seq.q_len) - j);
  }
  if (read_mask && p.mask_kind != AttentionMask::kNone) {
    const int64_t at = mask_row + j * p.mask_stride[3];
    if (p.mask_kind == AttentionMask::kBool) {
      if (static_cast<const uint8_t*>(p.mask)[at] == 0) s = -__builtin_inff();
    } else {
      s += attention_bias_at(p, at);
    }
  }
  if (test_band && (j < i + seq.band_lo || j > i + seq.band_hi)) s = -__builtin_inff();
  return s;
}

// s_ij after soft-capping, ALiBi, the mask and the band, from the scaled dot product.
GF_HOST_DEVICE_INLINE float attention_score(const AttentionParams& p, const AttentionSequence& seq, float scaled_dot,
                                            int64_t b, int64_t h, int64_t i, int64_t j) {
  return attention_score_in_row(p, seq, scaled_dot, b, h, i, j, attention_mask_row(p, b, h, i), true);
}

// Whether dropout keeps element (b, h, i, j), from the call's resolved key.
GF_HOST_DEVICE_INLINE bool attention_keeps(const AttentionParams& p, const AttentionSequence& seq, uint64_t seed,
                                           uint64_t offset, int64_t h, int64_t i, int64_t j) {
  const uint64_t index = static_cast<uint64_t>(seq.lse_row(h, i) * seq.row_length + seq.col0 + j);
  return philox_uniform(seed, offset, index) >= p.dropout_p;
}

}  // namespace genfast
