// Autograd of the native attention ops (genfast::attention_forward and attention_varlen_forward, on
// every device the extension serves), in C++: the backward op from the forward's saved inputs, o
// and lse. torch.library.register_autograd would put a Python layer on every call, 5-10 us that a
// decoding step with a short KV cache spends about as long as the kernel itself.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

namespace genfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&, double, double, int64_t,
                                                     int64_t, double, int64_t, int64_t, bool, bool,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&);
using BackwardOp =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    double, double, int64_t, int64_t, double, int64_t, int64_t, bool, bool, const std::optional<at::Tensor>&);
using VarlenForwardOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                                           const std::optional<at::Tensor>&, double, double,
                                                           int64_t, int64_t, double, int64_t, int64_t, bool,
                                                           const std::optional<at::Tensor>&,
                                                           const std::optional<at::Tensor>&,
                                                           const std::optional<at::Tensor>&,
                                                           const std::optional<at::Tensor>&);
using VarlenBackwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
    const std::optional<at::Tensor>&, double, double, int64_t, int64_t, double, int64_t, int64_t, bool,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::TypedOperatorHandle<ForwardOp>& forward_op() {
  static const auto handle = op<ForwardOp>("genfast::attention_forward");
  return handle;
}

const c10::TypedOperatorHandle<VarlenForwardOp>& varlen_forward_op() {
  static const auto handle = op<VarlenForwardOp>("genfast::attention_varlen_forward");
  return handle;
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The options after the tensors, in the ops' order: scale, softcap, band_lo, band_hi, dropout_p,
// seed, offset, deterministic.
struct AttentionOptions {
  double scale, softcap;
  int64_t band_lo, band_hi;
  double dropout_p;
  int64_t seed, offset;
  bool deterministic;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["band_lo"] = band_lo;
    ctx->saved_data["band_hi"] = band_hi;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["deterministic"] = deterministic;
  }
  static AttentionOptions saved(AutogradContext* ctx) {
    const auto& d = ctx->saved_data;
    return {d.at("scale").toDouble(),    d.at("softcap").toDouble(), d.at("band_lo").toInt(),
            d.at("band_hi").toInt(),     d.at("dropout_p").toDouble(), d.at("seed").toInt(),
            d.at("offset").toInt(),      d.at("deterministic").toBool()};
  }
};

// grad_o as the backward ops take it: zeros where only lse was used.
at::Tensor output_grad(const at::Tensor& grad_o, const at::Tensor& o) {
  return grad_o.defined() ? grad_o : at::zeros_like(o);
}

// Whether the additive mask's gradient takes mask_grad_without_keys: constant along the keys (its key
// dim 1), without sinks.
bool mask_alike_along_keys(const at::Tensor& attn_mask, const at::Tensor& sinks) {
  return !sinks.defined() && (attn_mask.dim() == 0 || attn_mask.size(-1) == 1);
}

// The gradient of an additive mask constant along the keys, without sinks: a row's bias shifts all
// its scores alike, which moves no probability, so only the row's lse moves, one for one; the
// gradient is grad_lse summed over the rows the mask spans (0 for a row without keys). Exact, where
// summing the kernels' dS = P (dP - delta) over the keys leaves each row a rounding residual of
// delta's, which a mask spanning many rows adds up (genfast check --fuzz, seed 123058: a scalar bias
// over 4590 rows). NaN in o, grad_o or lse propagates as the kernels' would. The Triton ops' autograd
// has the same in Python (genfast/ops/attention.py, _mask_grad_without_keys).
at::Tensor mask_grad_without_keys(const at::Tensor& attn_mask, const at::Tensor& grad_o,
                                  const std::optional<at::Tensor>& grad_lse, const at::Tensor& o,
                                  const at::Tensor& lse) {
  const at::Tensor no_keys = lse.eq(-std::numeric_limits<double>::infinity());
  const at::Tensor from_lse = grad_lse.has_value() ? grad_lse->to(at::kFloat) : at::zeros_like(lse);
  const at::Tensor nan_guard =
      ((grad_o.to(at::kFloat) * o.to(at::kFloat)).sum(-1) + at::where(no_keys, 0.0, lse)) * 0.0;
  return (at::where(no_keys, 0.0, from_lse) + nan_guard)
      .unsqueeze(-1)
      .sum_to_size(attn_mask.sizes())
      .to(attn_mask.scalar_type());
}

class Attention : public torch::autograd::Function<Attention> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& attn_mask,
                               const std::optional<at::Tensor>& alibi_slopes, const AttentionOptions& options,
                               bool float_o, const std::optional<at::Tensor>& sinks) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [o, lse] = forward_op().call(q, k, v, attn_mask, alibi_slopes, options.scale, options.softcap,
                                      options.band_lo, options.band_hi, options.dropout_p, options.seed,
                                      options.offset, options.deterministic, float_o, sinks, std::nullopt);
    ctx->set_materialize_grads(false);  // an unused lse has no gradient to subtract
    ctx->save_for_backward({q, k, v, o, lse, attn_mask.value_or(at::Tensor()), alibi_slopes.value_or(at::Tensor()),
                            sinks.value_or(at::Tensor())});
    ctx->saved_data["mask_needs_grad"] = attn_mask.has_value() && attn_mask->requires_grad();
    options.save(ctx);
    return {o, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &o = saved[3], &lse = saved[4];
    const at::Tensor &attn_mask = saved[5], &alibi_slopes = saved[6], &sinks = saved[7];
    const bool mask_needs_grad = ctx->saved_data.at("mask_needs_grad").toBool();
    const AttentionOptions options = AttentionOptions::saved(ctx);
    static const auto backward_op = op<BackwardOp>("genfast::attention_backward");
    const bool alike = mask_needs_grad && mask_alike_along_keys(attn_mask, sinks);
    const at::Tensor grad_o = output_grad(grads[0], o);
    auto [grad_q, grad_k, grad_v, grad_s, grad_sinks] = backward_op.call(
        grad_o, defined_or_none(grads[1]), q, k, v, o, lse, defined_or_none(attn_mask),
        defined_or_none(alibi_slopes), options.scale, options.softcap, options.band_lo, options.band_hi,
        options.dropout_p, options.seed, options.offset, mask_needs_grad && !alike, options.deterministic,
        defined_or_none(sinks));
    at::Tensor grad_mask;
    if (alike) {
      grad_mask = mask_grad_without_keys(attn_mask, grad_o, defined_or_none(grads[1]), o, lse);
    } else if (mask_needs_grad) {
      grad_mask = grad_s->sum_to_size(attn_mask.sizes());  // in the mask's dtype already
    }
    // One per argument of apply: q, k, v, attn_mask; none to alibi_slopes, the options and float_o;
    // then sinks.
    variable_list result = {grad_q, grad_k, grad_v, grad_mask};
    result.resize(8);
    if (sinks.defined() && sinks.requires_grad()) result[7] = *grad_sinks;
    return result;
  }
};

class AttentionVarlen : public torch::autograd::Function<AttentionVarlen> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                               int64_t max_seqlen_k, const std::optional<at::Tensor>& alibi_slopes,
                               const AttentionOptions& options, const std::optional<at::Tensor>& sinks,
                               const std::optional<at::Tensor>& seqused_k) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [o, lse] = varlen_forward_op().call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             alibi_slopes, options.scale, options.softcap, options.band_lo,
                                             options.band_hi, options.dropout_p, options.seed, options.offset,
                                             options.deterministic, sinks, seqused_k, std::nullopt, std::nullopt);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes.value_or(at::Tensor()),
                            sinks.value_or(at::Tensor()), seqused_k.value_or(at::Tensor())});
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    options.save(ctx);
    return {o, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &o = saved[3], &alibi_slopes = saved[7], &sinks = saved[8], &seqused_k = saved[9];
    const AttentionOptions options = AttentionOptions::saved(ctx);
    static const auto backward_op = op<VarlenBackwardOp>("genfast::attention_varlen_backward");
    auto [grad_q, grad_k, grad_v, grad_sinks] = backward_op.call(
        output_grad(grads[0], o), defined_or_none(grads[1]), saved[0], saved[1], saved[2], o, saved[4], saved[5],
        saved[6], ctx->saved_data.at("max_seqlen_q").toInt(), ctx->saved_data.at("max_seqlen_k").toInt(),
        defined_or_none(alibi_slopes), options.scale, options.softcap, options.band_lo, options.band_hi,
        options.dropout_p, options.seed, options.offset, options.deterministic, defined_or_none(sinks),
        defined_or_none(seqused_k));
    // One per argument of apply: q, k, v; none to the sequences' bounds and lengths, alibi_slopes
    // and the options; then sinks; none to seqused_k.
    variable_list result = {grad_q, grad_k, grad_v};
    result.resize(11);
    if (sinks.defined() && sinks.requires_grad()) result[9] = *grad_sinks;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> pair(const variable_list& outputs) { return {outputs[0], outputs[1]}; }

// Whether the call records a backward (alibi_slopes counted as before, though they get no gradient).
// Without one the forward op runs alone: an autograd Function's node and saved state cost about
// 2 us of an inference call whether they are used or not.
bool records_backward(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t != nullptr && t->requires_grad()) return true;
  return false;
}

// The ops' qv has no backward: genfast.attention and attention_varlen run a call asking for
// gradients on the concatenation qv stands for.
void refuse_qv_backward(const std::optional<at::Tensor>& qv, const char* op, const char* api) {
  TORCH_CHECK(!qv, op,
              ": qv serves inference and has no backward here; call it under torch.no_grad() or with inputs that do "
              "not require grad (",
              api, " gives qv gradients through the concatenation it stands for)");
}

std::tuple<at::Tensor, at::Tensor> attention_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t band_lo, int64_t band_hi,
    double dropout_p, int64_t seed, int64_t offset, bool deterministic, bool float_o,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& qv) {
  if (!records_backward({&q, &k, &v, attn_mask ? &*attn_mask : nullptr, alibi_slopes ? &*alibi_slopes : nullptr,
                         sinks ? &*sinks : nullptr, qv ? &*qv : nullptr})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(q, k, v, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p, seed,
                             offset, deterministic, float_o, sinks, qv);
  }
  refuse_qv_backward(qv, "genfast.attention_forward", "genfast.attention");
  return pair(Attention::apply(q, k, v, attn_mask, alibi_slopes,
                               AttentionOptions{scale, softcap, band_lo, band_hi, dropout_p, seed, offset,
                                                deterministic},
                               float_o, sinks));
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t band_lo, int64_t band_hi,
    double dropout_p, int64_t seed, int64_t offset, bool deterministic, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& seqused_k, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& qv) {
  if (!records_backward({&q, &k, &v, alibi_slopes ? &*alibi_slopes : nullptr, sinks ? &*sinks : nullptr,
                         qv ? &*qv : nullptr})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return varlen_forward_op().call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                                    scale, softcap, band_lo, band_hi, dropout_p, seed, offset, deterministic, sinks,
                                    seqused_k, block_table, qv);
  }
  TORCH_CHECK(!block_table, "genfast.attention_varlen_forward",
              ": a paged KV cache (block_table) serves inference and has no backward; call it under torch.no_grad() "
              "or with inputs that do not require grad");
  refuse_qv_backward(qv, "genfast.attention_varlen_forward", "genfast.attention_varlen");
  return pair(AttentionVarlen::apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                                     AttentionOptions{scale, softcap, band_lo, band_hi, dropout_p, seed, offset,
                                                      deterministic},
                                     sinks, seqused_k));
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, Autograd, m) {
  m.impl("attention_forward", &attention_forward_autograd);
  m.impl("attention_varlen_forward", &attention_varlen_forward_autograd);
}

}  // namespace genfast
