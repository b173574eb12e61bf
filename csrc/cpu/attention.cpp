// genfast::attention_forward on the CPU, flash-style: each (batch, head, block of 128 queries)
// walks the blocks of 64 keys its band can reach, keeping a running maximum, sum and output per
// query (online softmax), so that no Lq x Lk matrix is ever stored. Both products are the
// register-blocked block_product over packed panels (K^T, then V).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../attention_args.h"
#include "block_product.h"

namespace genfast {
namespace {

constexpr int64_t kQueryBlock = 128, kKeyBlock = 64;
static_assert(kQueryBlock % kRows == 0 && kKeyBlock % kCols == 0, "blocks are whole register tiles");

int64_t padded_to(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The row's maximum, NaN if any element is NaN.
GF_CPU_CLONES float row_max(const float* __restrict s, int64_t n) {
  float m = -__builtin_inff();
  for (int64_t c = 0; c < n; ++c) m = (s[c] > m || s[c] != s[c]) ? s[c] : m;
  return m;
}

// s = exp(s - m) in place; returns the sum.
GF_CPU_CLONES float exp_shifted(float* __restrict s, float m, int64_t n) {
  float sum = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    s[c] = exp_nonpositive(s[c] - m);
    sum += s[c];
  }
  return sum;
}

GF_CPU_CLONES void scale_row(float* __restrict r, float factor, int64_t n) {
  for (int64_t c = 0; c < n; ++c) r[c] *= factor;
}

struct Scratch {
  std::vector<float> k_panel, v_panel, scores, acc, max, sum;
  Scratch(int64_t dim, int64_t v_pad)
      : k_panel(static_cast<size_t>(dim * kKeyBlock)), v_panel(static_cast<size_t>(kKeyBlock * v_pad)),
        scores(static_cast<size_t>(kQueryBlock * kKeyBlock)), acc(static_cast<size_t>(kQueryBlock * v_pad)),
        max(kQueryBlock), sum(kQueryBlock) {}
};

// One block of queries against every key block its band reaches.
void query_block(const AttentionParams& p, uint64_t seed, uint64_t offset, int64_t b, int64_t h, int64_t i0,
                 Scratch& w) {
  const int64_t rows = std::min(kQueryBlock, p.q_len - i0), hk = h / (p.heads / p.kv_heads);
  const int64_t v_pad = padded_to(p.v_dim, kCols);
  const float* q = p.q + b * p.q_stride[0] + h * p.q_stride[1];
  const float* k = p.k + b * p.k_stride[0] + hk * p.k_stride[1];
  const float* v = p.v + b * p.v_stride[0] + hk * p.v_stride[1];
  const bool plain = p.softcap == 0.0f && p.alibi_slopes == nullptr && p.mask_kind == AttentionMask::kNone;
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  std::fill(w.max.begin(), w.max.end(), -__builtin_inff());
  std::fill(w.sum.begin(), w.sum.end(), 0.0f);
  // Keys the band lets any of these queries see.
  const int64_t first_key = std::max<int64_t>(0, p.band_lo <= -kAttentionUnbounded ? 0 : i0 + p.band_lo);
  const int64_t end_key =
      std::min<int64_t>(p.k_len, p.band_hi >= kAttentionUnbounded ? p.k_len : i0 + rows - 1 + p.band_hi + 1);
  for (int64_t j0 = first_key / kKeyBlock * kKeyBlock; j0 < end_key; j0 += kKeyBlock) {
    const int64_t cols = std::min(kKeyBlock, p.k_len - j0);
    for (int64_t c = 0; c < kKeyBlock; ++c) {  // K^T: reading each key's row in order
      const float* key = k + (j0 + c) * p.k_stride[2];
      for (int64_t d = 0; d < p.dim; ++d) w.k_panel[d * kKeyBlock + c] = c < cols ? key[d] : 0.0f;
    }
    // Scores of the block: 8 queries x 16 keys at a time.
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const float* a_rows[kRows];
      for (int r = 0; r < kRows; ++r) a_rows[r] = q + (i0 + std::min<int64_t>(r0 + r, rows - 1)) * p.q_stride[2];
      for (int64_t c0 = 0; c0 < kKeyBlock; c0 += kCols) {
        float tile[kRows][kCols];
        block_product(a_rows, 1, w.k_panel.data() + c0, kKeyBlock, p.dim, tile);
        for (int r = 0; r < kRows && r0 + r < rows; ++r) {
          for (int c = 0; c < kCols; ++c) w.scores[(r0 + r) * kKeyBlock + c0 + c] = tile[r][c] * p.scale;
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      float* s = w.scores.data() + r * kKeyBlock;
      if (!plain) {
        for (int64_t c = 0; c < cols; ++c) s[c] = attention_score(p, s[c], b, h, i, j0 + c);
      }
      // The band (and the block's tail) as a range of columns.
      const int64_t lo = p.band_lo <= -kAttentionUnbounded ? 0 : std::clamp<int64_t>(i + p.band_lo - j0, 0, cols);
      const int64_t hi = p.band_hi >= kAttentionUnbounded ? cols : std::clamp<int64_t>(i + p.band_hi - j0 + 1, 0, cols);
      if (lo > 0 || hi < kKeyBlock) {
        for (int64_t c = 0; c < kKeyBlock; ++c) {
          if (c < lo || c >= std::max(lo, hi)) s[c] = -__builtin_inff();
        }
      }
      const float block_max = row_max(s, kKeyBlock);
      const float old_max = w.max[r];
      const float new_max = (block_max > old_max || block_max != block_max) ? block_max : old_max;
      if (new_max == -__builtin_inff()) {  // nothing seen yet: the block adds nothing
        std::fill(s, s + kKeyBlock, 0.0f);
        continue;
      }
      const float rescale = exp_nonpositive(old_max - new_max);  // 0 when old_max = -inf
      w.sum[r] = w.sum[r] * rescale + exp_shifted(s, new_max, kKeyBlock);
      w.max[r] = new_max;
      scale_row(w.acc.data() + r * v_pad, rescale, v_pad);
      if (p.dropout_p > 0.0f) {
        const float keep_scale = 1.0f / (1.0f - p.dropout_p);
        for (int64_t c = 0; c < cols; ++c) {
          s[c] = attention_keeps(p, seed, offset, b, h, i, j0 + c) ? s[c] * keep_scale : 0.0f;
        }
      }
    }
    // acc += P V over the block: 8 queries x 16 value columns at a time.
    for (int64_t c = 0; c < kKeyBlock; ++c) {
      for (int64_t d = 0; d < v_pad; ++d) {
        w.v_panel[c * v_pad + d] = c < cols && d < p.v_dim ? v[(j0 + c) * p.v_stride[2] + d] : 0.0f;
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const float* a_rows[kRows];
      for (int r = 0; r < kRows; ++r) a_rows[r] = w.scores.data() + std::min<int64_t>(r0 + r, rows - 1) * kKeyBlock;
      for (int64_t d0 = 0; d0 < v_pad; d0 += kCols) {
        float tile[kRows][kCols];
        block_product(a_rows, 1, w.v_panel.data() + d0, v_pad, kKeyBlock, tile);
        for (int r = 0; r < kRows && r0 + r < rows; ++r) {
          float* acc = w.acc.data() + (r0 + r) * v_pad + d0;
          for (int c = 0; c < kCols; ++c) acc[c] += tile[r][c];
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = (b * p.heads + h) * p.q_len + i0 + r;
    const float sum = w.sum[r];
    const bool seen = !(w.max[r] == -__builtin_inff());  // NaN counts as seen
    const float inverse = seen ? 1.0f / sum : 0.0f;
    for (int64_t d = 0; d < p.v_dim; ++d) p.o[row * p.v_dim + d] = seen ? w.acc[r * v_pad + d] * inverse : 0.0f;
    p.lse[row] = seen ? w.max[r] + log_f32(sum) : -__builtin_inff();
  }
}

void attention_forward_impl(const AttentionParams& p) {
  uint64_t seed = 0, offset = 0;
  resolve_philox_key(p.key, &seed, &offset);
  const int64_t q_blocks = (p.q_len + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, p.batch * p.heads * q_blocks, 1, [&](int64_t first, int64_t last) {
    Scratch scratch(p.dim, padded_to(p.v_dim, kCols));
    for (int64_t task = first; task < last; ++task) {
      const int64_t block = task % q_blocks, bh = task / q_blocks;
      query_block(p, seed, offset, bh / p.heads, bh % p.heads, block * kQueryBlock, scratch);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const std::optional<at::Tensor>& attn_mask,
                                                         const std::optional<at::Tensor>& alibi_slopes, double scale,
                                                         double softcap, int64_t band_lo, int64_t band_hi,
                                                         double dropout_p, const std::optional<at::Generator>& generator,
                                                         int64_t seed, int64_t offset) {
  TORCH_CHECK(!generator.has_value(), kAttentionOp, ": generator is for CUDA; on the CPU pass seed and offset");
  check_attention_options(scale, softcap, dropout_p);
  const AttentionTensors t = prepare_attention(q, k, v, attn_mask, alibi_slopes);
  const auto floats = q.options().dtype(at::kFloat);
  at::Tensor o = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, floats);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, floats);
  if (o.numel() > 0 || lse.numel() > 0) {
    const PhiloxKeyRef key{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), nullptr, nullptr};
    attention_forward_impl(attention_params(t, scale, softcap, band_lo, band_hi, dropout_p, key, o, lse));
  }
  return {o.to(q.scalar_type()), lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("attention_forward", &attention_forward_cpu); }

}  // namespace genfast
