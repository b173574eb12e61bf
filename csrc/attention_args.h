// Checks and preparation shared by the bindings of genfast::attention_forward.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../kernels/common/attention.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kAttentionOp = "genfast.attention_forward";

constexpr const char* kAttentionVarlenOp = "genfast.attention_varlen_forward";

struct AttentionTensors {
  // float32 on the CPU, else the inputs' dtype; the head dim contiguous. The mask uint8, or float32,
  // float16 or bfloat16 (bias_type) as the caller gave it, expanded to (B, H, Lq, Lk).
  at::Tensor q, k, v, mask, alibi;
  at::Tensor sinks;  // float32 (heads), contiguous; undefined without sinks
  at::Tensor qv;     // q's layout with v's head dim, the head dim contiguous; undefined without qv
  at::ScalarType sinks_dtype = at::kFloat;  // the caller's, for their gradient
  AttentionMask mask_kind = AttentionMask::kNone;
  AttentionBias bias_type = AttentionBias::kFloat32;
  at::Tensor cu_seqlens_q, cu_seqlens_k;  // varlen: int32 contiguous
  at::Tensor seqused_k;                   // varlen: int32 (batch) contiguous, or undefined
  at::Tensor block_table;                 // varlen: int32 (batch, pages) contiguous with paged k and v, or undefined
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  // The shape of the backward's dS with grad_mask: (B, H, Lq, Lk), with 1 for each of B, H and Lq
  // where the mask (right-aligned) has 1 or no dim; the kernels sum dS over those. The op's mask
  // gradient (attention_mask_grad) is that, summed over the keys too where the mask has one column,
  // in an additive mask's own dtype, else float32.
  std::vector<int64_t> mask_grad_shape;
  bool mask_grad_sums_keys = false;
  at::ScalarType mask_grad_dtype = at::kFloat;
};

// The op's mask gradient from the kernels' float32 dS in AttentionTensors::mask_grad_shape: summed over
// the keys in float32 where the mask has one column, then rounded once.
inline at::Tensor attention_mask_grad(const AttentionTensors& t, const at::Tensor& summed) {
  return (t.mask_grad_sums_keys ? summed.sum(-1, /*keepdim=*/true) : summed).to(t.mask_grad_dtype);
}

inline at::Tensor attention_rows(const at::Tensor& t, bool as_float) {
  at::Tensor f = as_float ? t.to(at::kFloat) : t;
  return f.stride(-1) == 1 ? f : f.contiguous();
}

inline void check_attention_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                int64_t dims) {
  check_floating_input(op, q, "q");
  TORCH_CHECK(q.dim() == dims && k.dim() == dims && v.dim() == dims, op, ": q, k and v must be ",
              dims == 4 ? "(batch, heads, length, dim)" : "(total, heads, dim)", ", got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": k and v must have q's dtype ", q.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": k and v must be on q's device");
  const int64_t head = 1, position = dims == 4 ? 2 : 0;
  TORCH_CHECK(k.size(-1) == q.size(-1), op, ": k's head dim must equal q's (", q.size(-1), "), got ", k.size(-1));
  TORCH_CHECK(v.size(head) == k.size(head) && v.size(position) == k.size(position), op,
              ": v must have k's heads and length, got ", v.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(head) > 0 && q.size(head) % k.size(head) == 0, op, ": k's heads (", k.size(head),
              ") must divide q's heads (", q.size(head), ")");
}

inline void check_alibi(const char* op, const at::Tensor& s, int64_t batch, int64_t heads, const at::Tensor& q,
                        AttentionTensors& t) {
  TORCH_CHECK(s.sizes() == at::IntArrayRef({heads}) || s.sizes() == at::IntArrayRef({batch, heads}), op,
              ": alibi_slopes must have shape (heads,) or (batch, heads), got ", s.sizes());
  TORCH_CHECK(s.device() == q.device(), op, ": alibi_slopes must be on q's device");
  t.alibi = s.to(at::kFloat).contiguous();
}

// The forward's attention sinks: one logit per query head, any float dtype, read as float32.
inline void set_attention_sinks(const char* op, AttentionTensors& t, const std::optional<at::Tensor>& sinks,
                                int64_t heads, const at::Tensor& q) {
  if (!sinks) return;
  TORCH_CHECK(sinks->sizes() == at::IntArrayRef({heads}), op, ": sinks must have shape (heads,) = (", heads,
              ",), got ", sinks->sizes());
  TORCH_CHECK(at::isFloatingType(sinks->scalar_type()), op, ": sinks must be floating point, got ",
              sinks->scalar_type());
  TORCH_CHECK(sinks->device() == q.device(), op, ": sinks must be on q's device");
  t.sinks = sinks->to(at::kFloat).contiguous();
  t.sinks_dtype = sinks->scalar_type();
}

// qv (batch, heads, Lq, v_dim), or (total_q, heads, v_dim) beside packed q: q's shape, dtype and device
// with v's head dim (set_attention_sinks' kind of check); kept in q's dtype, the head dim contiguous.
inline void set_attention_qv(const char* op, AttentionTensors& t, const std::optional<at::Tensor>& qv,
                             const at::Tensor& q, const at::Tensor& v) {
  if (!qv) return;
  std::vector<int64_t> want(q.sizes().begin(), q.sizes().end());
  want.back() = v.size(-1);
  TORCH_CHECK(qv->sizes() == at::IntArrayRef(want), op, ": qv must be q's shape with v's head dim, ", want, ", got ",
              qv->sizes());
  TORCH_CHECK(qv->scalar_type() == q.scalar_type(), op, ": qv must have q's dtype ", q.scalar_type(), ", got ",
              qv->scalar_type());
  TORCH_CHECK(qv->device() == q.device(), op, ": qv must be on q's device");
  t.qv = attention_rows(*qv, /*as_float=*/false);
}

// The sinks' gradient from the backward's delta_r = grad_o_r . o_r - grad_lse_r and the forward's lse,
// both in lse's layout: d sink_h = -sum over the rows r of head h of e^(sink_h - lse_r) delta_r, in
// the sinks' dtype; none without sinks.
inline std::optional<at::Tensor> attention_sink_grad(const AttentionTensors& t, const at::Tensor& delta,
                                                     const at::Tensor& lse) {
  if (!t.sinks.defined()) return std::nullopt;
  const bool varlen = t.cu_seqlens_q.defined();
  const at::Tensor sink = varlen ? t.sinks.view({-1, 1}) : t.sinks.view({1, -1, 1});
  // lse >= sink, so the weight is at most 1; lse = -inf only where the sink is -inf too: weight 0.
  const at::Tensor weight = at::where(lse == -INFINITY, at::zeros_like(lse), at::exp(sink - lse));
  const at::Tensor per_row = weight * delta;
  return (-(varlen ? per_row.sum(1) : per_row.sum(std::vector<int64_t>{0, 2}))).to(t.sinks_dtype);
}

// as_float: the CPU kernels read float32; the CUDA kernels read the inputs' own dtype.
inline AttentionTensors prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& attn_mask,
                                          const std::optional<at::Tensor>& alibi_slopes, bool as_float = true) {
  const char* op = kAttentionOp;
  check_attention_qkv(op, q, k, v, 4);
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2);
  TORCH_CHECK(k.size(0) == batch && v.size(0) == batch, op, ": k and v must have q's batch size ", batch);
  AttentionTensors t;
  t.q = attention_rows(q, as_float);
  t.k = attention_rows(k, as_float);
  t.v = attention_rows(v, as_float);
  if (attn_mask) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(m.device() == q.device(), op, ": attn_mask must be on q's device");
    const std::vector<int64_t> full{batch, heads, q_len, k.size(2)};
    TORCH_CHECK(m.dim() <= 4, op, ": attn_mask must broadcast to ", at::IntArrayRef(full), ", got ", m.sizes());
    for (int64_t d = 0; d < m.dim(); ++d) {
      const int64_t size = m.size(m.dim() - 1 - d), want = full[3 - d];
      TORCH_CHECK(size == 1 || size == want, op, ": attn_mask must broadcast to ", at::IntArrayRef(full), ", got ",
                  m.sizes());
    }
    t.mask_grad_shape = full;
    for (int64_t d = 0; d < 3; ++d) {
      const int64_t at = d - (4 - m.dim());  // the mask's dim for d, if it has one
      if (at < 0 || m.size(at) == 1) t.mask_grad_shape[d] = 1;
    }
    t.mask_grad_sums_keys = m.dim() == 0 || m.size(-1) == 1;
    if (m.scalar_type() == at::kBool) {
      t.mask = m.view(at::kByte).expand(full);  // the same bytes, no copy
      t.mask_kind = AttentionMask::kBool;
    } else {
      TORCH_CHECK(at::isFloatingType(m.scalar_type()), op, ": attn_mask must be bool or floating point, got ",
                  m.scalar_type());
      const at::ScalarType type = m.scalar_type();
      const bool read_as_is = type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
      t.mask = (read_as_is ? m : m.to(at::kFloat)).expand(full);  // a float16 or bfloat16 bias is not copied
      t.mask_kind = AttentionMask::kAdditive;
      t.mask_grad_dtype = type;
      t.bias_type = type == at::kHalf       ? AttentionBias::kFloat16
                    : type == at::kBFloat16 ? AttentionBias::kBFloat16
                                            : AttentionBias::kFloat32;
    }
  }
  if (alibi_slopes) check_alibi(op, *alibi_slopes, batch, heads, q, t);
  return t;
}

// A paged KV cache: k and v (pages, page_size, kv_heads, dim[v]), page_size at least 1, and
// block_table int32 (batch, pages per sequence) on q's device.
inline void check_attention_pages(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& block_table, int64_t batch, int64_t max_seqlen_k) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, op,
              ": with block_table, k and v must be paged caches (pages, page_size, kv_heads, dim), got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(v.size(1) == k.size(1), op, ": v must have k's page size ", k.size(1), ", got ", v.size(1));
  TORCH_CHECK(k.size(1) > 0 && k.size(1) <= INT32_MAX, op,
              ": a paged cache's page size (k.size(1)) must be from 1 to 2^31 - 1, got ", k.size(1));
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == batch, op,
              ": block_table must have shape (batch, pages per sequence) with batch = ", batch, ", got ",
              block_table.sizes());
  TORCH_CHECK(block_table.scalar_type() == at::kInt, op, ": block_table must be int32, got ",
              block_table.scalar_type());
  TORCH_CHECK(block_table.device() == q.device(), op, ": block_table must be on q's device");
  TORCH_CHECK(max_seqlen_k <= block_table.size(1) * k.size(1), op, ": block_table's rows hold ", block_table.size(1),
              " pages of ", k.size(1), " keys, fewer than max_seqlen_k (", max_seqlen_k, ")");
}

// Packed sequences: q (total_q, heads, dim), k and v (total_k, kv_heads, dim[v]), cu_seqlens int32
// (batch + 1) on q's device, and optionally seqused_k, int32 (batch,): sequence b uses only the first
// seqused_k[b] keys of its rows (kernels/common/attention.h); or, with block_table, k and v paged
// (check_attention_pages). Their values are not read here (no device synchronization): cu_seqlens
// must rise from 0 (to total, unpaged), each step at most max_seqlen (cu_seqlens_k's unbounded
// where seqused_k is given, unpaged), seqused_k[b] lie in 0 .. cu_seqlens_k[b + 1] - cu_seqlens_k[b]
// and at most max_seqlen_k, and block_table's rows name pages of k for those keys.
inline AttentionTensors prepare_attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                 int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                 const std::optional<at::Tensor>& alibi_slopes,
                                                 const std::optional<at::Tensor>& seqused_k,
                                                 const std::optional<at::Tensor>& block_table, bool as_float = true) {
  const char* op = kAttentionVarlenOp;
  for (const auto& [cu, name] : {std::pair{&cu_seqlens_q, "cu_seqlens_q"}, std::pair{&cu_seqlens_k, "cu_seqlens_k"}}) {
    TORCH_CHECK(cu->dim() == 1 && cu->size(0) >= 1, op, ": ", name, " must be (batch + 1,), got ", cu->sizes());
    TORCH_CHECK(cu->scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu->scalar_type());
    TORCH_CHECK(cu->device() == q.device(), op, ": ", name, " must be on q's device");
  }
  TORCH_CHECK(cu_seqlens_k.size(0) == cu_seqlens_q.size(0), op, ": cu_seqlens_k must have cu_seqlens_q's length ",
              cu_seqlens_q.size(0), ", got ", cu_seqlens_k.size(0));
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0");
  if (block_table) {
    check_attention_pages(op, q, k, v, *block_table, cu_seqlens_q.size(0) - 1, max_seqlen_k);
    check_attention_qkv(op, q, k.select(1, 0), v.select(1, 0), 3);  // a page's first rows, as (pages, heads, dim)
  } else {
    check_attention_qkv(op, q, k, v, 3);
  }
  AttentionTensors t;
  t.q = attention_rows(q, as_float);
  t.k = attention_rows(k, as_float);
  t.v = attention_rows(v, as_float);
  t.cu_seqlens_q = cu_seqlens_q.contiguous();
  t.cu_seqlens_k = cu_seqlens_k.contiguous();
  t.max_seqlen_q = max_seqlen_q;
  t.max_seqlen_k = max_seqlen_k;
  if (alibi_slopes) check_alibi(op, *alibi_slopes, cu_seqlens_q.size(0) - 1, q.size(1), q, t);
  if (seqused_k) {
    const int64_t batch = cu_seqlens_k.size(0) - 1;
    TORCH_CHECK(seqused_k->dim() == 1 && seqused_k->size(0) == batch, op,
                ": seqused_k must have shape (batch,) = (", batch, ",), got ", seqused_k->sizes());
    TORCH_CHECK(seqused_k->scalar_type() == at::kInt, op, ": seqused_k must be int32, got ",
                seqused_k->scalar_type());
    TORCH_CHECK(seqused_k->device() == q.device(), op, ": seqused_k must be on q's device");
    t.seqused_k = seqused_k->contiguous();
  }
  if (block_table) t.block_table = block_table->contiguous();
  return t;
}

// The params of a call; q, k, v, o and lse are left to the caller where they are not float32
// (the CUDA kernels read the inputs' dtype through their own pointers).
inline AttentionParams attention_params(const AttentionTensors& t, double scale, double softcap, int64_t band_lo,
                                        int64_t band_hi, double dropout_p, int64_t seed, int64_t offset,
                                        const at::Tensor& o, const at::Tensor& lse) {
  AttentionParams p{};
  const bool varlen = t.cu_seqlens_q.defined();
  p.batch = varlen ? t.cu_seqlens_q.size(0) - 1 : t.q.size(0);
  p.heads = t.q.size(-2 - !varlen);
  p.kv_heads = t.k.size(-2 - !varlen);
  p.q_len = varlen ? t.max_seqlen_q : t.q.size(2);
  p.k_len = varlen ? t.max_seqlen_k : t.k.size(2);
  p.dim = t.q.size(-1);
  p.v_dim = t.v.size(-1);
  if (varlen) {
    p.cu_seqlens_q = t.cu_seqlens_q.const_data_ptr<int32_t>();
    p.cu_seqlens_k = t.cu_seqlens_k.const_data_ptr<int32_t>();
    p.seqused_k = t.seqused_k.defined() ? t.seqused_k.const_data_ptr<int32_t>() : nullptr;
    p.total_q = t.q.size(0);
    p.total_k = t.k.dim() == 4 ? t.k.size(0) * t.k.size(1) : t.k.size(0);  // paged: the pages' rows
    if (t.block_table.defined()) {
      p.block_table = t.block_table.const_data_ptr<int32_t>();
      p.block_table_stride = t.block_table.size(1);
      p.page_size = t.k.size(1);
    }
  }
  const auto strides = [varlen](const at::Tensor& x, int64_t* out) {  // (batch or page, head, position)
    if (x.dim() == 4 && varlen) {  // paged (page, position, head, dim)
      out[0] = x.stride(0);
      out[1] = x.stride(2);
      out[2] = x.stride(1);
      return;
    }
    for (int d = 0; d < 3; ++d) out[d] = varlen ? (d == 0 ? 0 : x.stride(2 - d)) : x.stride(d);
  };
  const auto floats = [](const at::Tensor& x) {
    return x.scalar_type() == at::kFloat ? x.const_data_ptr<float>() : nullptr;
  };
  p.q = floats(t.q);
  strides(t.q, p.q_stride);
  p.k = floats(t.k);
  strides(t.k, p.k_stride);
  p.v = floats(t.v);
  strides(t.v, p.v_stride);
  if (t.qv.defined()) {
    p.qv = floats(t.qv);
    strides(t.qv, p.qv_stride);
  }
  p.mask_kind = t.mask_kind;
  p.bias_type = t.bias_type;
  p.mask = t.mask.defined() ? t.mask.const_data_ptr() : nullptr;
  for (int d = 0; d < 4; ++d) p.mask_stride[d] = t.mask.defined() ? t.mask.stride(d) : 0;
  p.alibi_slopes = t.alibi.defined() ? t.alibi.const_data_ptr<float>() : nullptr;
  p.alibi_batch_stride = t.alibi.defined() && t.alibi.dim() == 2 ? p.heads : 0;
  p.sinks = t.sinks.defined() ? t.sinks.const_data_ptr<float>() : nullptr;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.band_lo = band_lo;
  p.band_hi = band_hi;
  p.dropout_p = static_cast<float>(dropout_p);
  p.key = PhiloxKeyRef{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), nullptr, nullptr};
  p.o = o.defined() && o.scalar_type() == at::kFloat ? o.mutable_data_ptr<float>() : nullptr;
  p.lse = lse.defined() ? lse.mutable_data_ptr<float>() : nullptr;
  return p;
}

// What the backward reads beside the forward's inputs: grad_o in o's layout (head dim contiguous;
// float32 when as_float) and lse float32 contiguous. Each device computes delta_i = grad_o_i . o_i -
// grad_lse_i itself, in lse's layout ((batch, heads, Lq), varlen (heads, total_q)), float32.
struct AttentionGradInputs {
  at::Tensor grad_o, lse;
};

// What a backward op returns: grad_q, grad_k, grad_v, with grad_mask the mask's gradient, with sinks
// theirs (attention_sink_grad).
using AttentionBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>;

inline AttentionGradInputs prepare_attention_grads(const char* op, const AttentionTensors& t, const at::Tensor& grad_o,
                                                   const std::optional<at::Tensor>& grad_lse, const at::Tensor& o,
                                                   const at::Tensor& lse, bool as_float = true) {
  const bool varlen = t.cu_seqlens_q.defined();
  std::vector<int64_t> o_shape(t.q.sizes().begin(), t.q.sizes().end());
  o_shape.back() = t.v.size(-1);
  const std::vector<int64_t> lse_shape =
      varlen ? std::vector<int64_t>{t.q.size(1), t.q.size(0)} : std::vector<int64_t>{t.q.size(0), t.q.size(1), t.q.size(2)};
  TORCH_CHECK(grad_o.sizes() == at::IntArrayRef(o_shape) && o.sizes() == at::IntArrayRef(o_shape), op,
              ": grad_o and o must have the output's shape ", at::IntArrayRef(o_shape), ", got ", grad_o.sizes(),
              " and ", o.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape) && lse.scalar_type() == at::kFloat, op,
              ": lse must be float32 ", at::IntArrayRef(lse_shape), ", got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(grad_o.device() == t.q.device() && o.device() == t.q.device() && lse.device() == t.q.device(), op,
              ": grad_o, o and lse must be on q's device");
  if (grad_lse) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes(), op, ": grad_lse must have lse's shape ", lse.sizes(), ", got ",
                grad_lse->sizes());
  }
  AttentionGradInputs g;
  g.grad_o = as_float ? grad_o.to(at::kFloat).contiguous() : grad_o.contiguous();
  g.lse = lse.contiguous();
  return g;
}

inline void check_attention_options(double scale, double softcap, double dropout_p, bool paged = false) {
  TORCH_CHECK(scale == scale, kAttentionOp, ": scale must not be NaN");
  TORCH_CHECK(softcap >= 0.0, kAttentionOp, ": softcap must be >= 0 (0: none), got ", softcap);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kAttentionOp, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(!paged || dropout_p == 0.0, kAttentionVarlenOp,
              ": dropout_p must be 0 with block_table (a paged KV cache serves inference), got ", dropout_p);
}

}  // namespace genfast
