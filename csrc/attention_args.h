// Checks and preparation shared by the bindings of genfast::attention_forward.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../kernels/common/attention.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kAttentionOp = "genfast.attention_forward";

struct AttentionTensors {
  at::Tensor q, k, v, mask, alibi;  // float32 (mask uint8 or float32, expanded to (B, H, Lq, Lk))
  AttentionMask mask_kind = AttentionMask::kNone;
};

inline at::Tensor float_rows(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat);
  return f.stride(-1) == 1 ? f : f.contiguous();
}

inline AttentionTensors prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& attn_mask,
                                          const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = kAttentionOp;
  check_floating_input(op, q, "q");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k and v must be (batch, heads, length, dim), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": k and v must have q's dtype ", q.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": k and v must be on q's device");
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2);
  TORCH_CHECK(k.size(0) == batch && v.size(0) == batch, op, ": k and v must have q's batch size ", batch);
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k's head dim must equal q's (", q.size(3), "), got ", k.size(3));
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), op, ": v must have k's heads and length ",
              k.sizes().slice(1, 2), ", got ", v.sizes().slice(1, 2));
  TORCH_CHECK(k.size(1) > 0 && heads % k.size(1) == 0, op, ": k's heads (", k.size(1),
              ") must divide q's heads (", heads, ")");
  AttentionTensors t;
  t.q = float_rows(q);
  t.k = float_rows(k);
  t.v = float_rows(v);
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
    if (m.scalar_type() == at::kBool) {
      t.mask = m.to(at::kByte).expand(full);
      t.mask_kind = AttentionMask::kBool;
    } else {
      TORCH_CHECK(at::isFloatingType(m.scalar_type()), op, ": attn_mask must be bool or floating point, got ",
                  m.scalar_type());
      t.mask = m.to(at::kFloat).expand(full);
      t.mask_kind = AttentionMask::kAdditive;
    }
  }
  if (alibi_slopes) {
    const at::Tensor& s = *alibi_slopes;
    TORCH_CHECK(s.sizes() == at::IntArrayRef({heads}) || s.sizes() == at::IntArrayRef({batch, heads}), op,
                ": alibi_slopes must have shape (heads,) or (batch, heads), got ", s.sizes());
    TORCH_CHECK(s.device() == q.device(), op, ": alibi_slopes must be on q's device");
    t.alibi = s.to(at::kFloat).contiguous();
  }
  return t;
}

inline AttentionParams attention_params(const AttentionTensors& t, double scale, double softcap, int64_t band_lo,
                                        int64_t band_hi, double dropout_p, const PhiloxKeyRef& key,
                                        const at::Tensor& o, const at::Tensor& lse) {
  AttentionParams p{};
  p.batch = t.q.size(0);
  p.heads = t.q.size(1);
  p.kv_heads = t.k.size(1);
  p.q_len = t.q.size(2);
  p.k_len = t.k.size(2);
  p.dim = t.q.size(3);
  p.v_dim = t.v.size(3);
  const auto strides = [](const at::Tensor& x, int64_t* out) {
    for (int d = 0; d < 3; ++d) out[d] = x.stride(d);
  };
  p.q = t.q.const_data_ptr<float>();
  strides(t.q, p.q_stride);
  p.k = t.k.const_data_ptr<float>();
  strides(t.k, p.k_stride);
  p.v = t.v.const_data_ptr<float>();
  strides(t.v, p.v_stride);
  p.mask_kind = t.mask_kind;
  p.mask = t.mask.defined() ? t.mask.const_data_ptr() : nullptr;
  for (int d = 0; d < 4; ++d) p.mask_stride[d] = t.mask.defined() ? t.mask.stride(d) : 0;
  p.alibi_slopes = t.alibi.defined() ? t.alibi.const_data_ptr<float>() : nullptr;
  p.alibi_batch_stride = t.alibi.defined() && t.alibi.dim() == 2 ? p.heads : 0;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.band_lo = band_lo;
  p.band_hi = band_hi;
  p.dropout_p = static_cast<float>(dropout_p);
  p.key = key;
  p.o = o.defined() ? o.mutable_data_ptr<float>() : nullptr;
  p.lse = lse.defined() ? lse.mutable_data_ptr<float>() : nullptr;
  return p;
}

inline void check_attention_options(double scale, double softcap, double dropout_p) {
  TORCH_CHECK(scale == scale, kAttentionOp, ": scale must not be NaN");
  TORCH_CHECK(softcap >= 0.0, kAttentionOp, ": softcap must be >= 0 (0: none), got ", softcap);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kAttentionOp, ": dropout_p must be in [0, 1), got ", dropout_p);
}

}  // namespace genfast
