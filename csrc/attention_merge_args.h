// Checks and parameters of genfast::attention_merge and its backward (kernels/common/attention_merge.h),
// shared by their CPU and CUDA bindings: every error names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../kernels/common/attention_merge.h"
#include "elementwise_args.h"

namespace genfast {

constexpr const char* kAttentionMergeOp = "genfast.attention_merge";

inline void check_attention_merge(at::TensorList o, at::TensorList lse, double ln_base) {
  const char* op = kAttentionMergeOp;
  TORCH_CHECK(std::isfinite(ln_base) && ln_base > 0.0, op,
              ": ln_base (the natural log of lse's base) must be finite and positive, got ", ln_base);
  TORCH_CHECK(!o.empty() && lse.size() == o.size(), op, ": o and lse must hold one tensor per state, at least one, got ",
              o.size(), " and ", lse.size());
  check_floating_input(op, o[0], "o");
  TORCH_CHECK(o[0].dim() == 3, op, ": o's states must be (rows_outer, rows_inner, head_dim), got ", o[0].sizes());
  for (size_t s = 0; s < o.size(); ++s) {
    TORCH_CHECK(o[s].sizes() == o[0].sizes() && o[s].scalar_type() == o[0].scalar_type() &&
                    o[s].device() == o[0].device(),
                op, ": o[", s, "] must be a ", o[0].scalar_type(), " tensor ", o[0].sizes(), " on ", o[0].device(),
                " as o[0], got ", o[s].scalar_type(), " ", o[s].sizes(), " on ", o[s].device());
    TORCH_CHECK(lse[s].sizes() == o[0].sizes().slice(0, 2) && lse[s].scalar_type() == at::kFloat &&
                    lse[s].device() == o[0].device(),
                op, ": lse[", s, "] must be a float32 tensor ", o[0].sizes().slice(0, 2),
                " (o's shape without the head dim) on ", o[0].device(), ", got ", lse[s].scalar_type(), " ",
                lse[s].sizes(), " on ", lse[s].device());
  }
}

inline void check_attention_merge_grads(const at::Tensor& o, const at::Tensor& grad_out,
                                        const std::optional<at::Tensor>& grad_lse) {
  const char* op = kAttentionMergeOp;
  TORCH_CHECK(grad_out.sizes() == o.sizes() && grad_out.scalar_type() == o.scalar_type() &&
                  grad_out.device() == o.device(),
              op, ": grad_out must be a ", o.scalar_type(), " tensor ", o.sizes(), " on ", o.device(), ", got ",
              grad_out.scalar_type(), " ", grad_out.sizes(), " on ", grad_out.device());
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->sizes() == o.sizes().slice(0, 2) && grad_lse->scalar_type() == at::kFloat &&
                    grad_lse->device() == o.device(),
                op, ": grad_lse must be a float32 tensor ", o.sizes().slice(0, 2), " on ", o.device(), ", got ",
                grad_lse->scalar_type(), " ", grad_lse->sizes(), " on ", grad_lse->device());
  }
}

// The states as the kernels read them: one layout for all (features contiguous for o), copied
// contiguous where they differ, and placed where AttentionMergeStates can name them (any places for
// up to kListed states, evenly spaced past that), stacked into one tensor where they are not.
inline std::vector<at::Tensor> attention_merge_states(at::TensorList states, bool features) {
  std::vector<at::Tensor> v(states.begin(), states.end());
  bool shared = !features || v[0].size(-1) <= 1 || v[0].stride(-1) == 1;
  for (const at::Tensor& t : v) shared = shared && t.strides() == v[0].strides();
  if (!shared) {
    for (at::Tensor& t : v) t = t.contiguous();
  }
  const auto base = reinterpret_cast<intptr_t>(v[0].const_data_ptr());
  const int64_t size = static_cast<int64_t>(v[0].element_size());
  const int64_t spacing = v.size() > 1 ? reinterpret_cast<intptr_t>(v[1].const_data_ptr()) - base : 0;
  bool placed = true;
  for (size_t s = 0; s < v.size(); ++s) {
    const int64_t at = reinterpret_cast<intptr_t>(v[s].const_data_ptr()) - base;
    placed = placed && at % size == 0 && (v.size() <= AttentionMergeStates::kListed || at == spacing * int64_t(s));
  }
  if (!placed) v = at::stack(v).unbind(0);
  return v;
}

inline AttentionMergeStates attention_merge_places(const std::vector<at::Tensor>& v) {
  AttentionMergeStates places{};
  const auto base = reinterpret_cast<intptr_t>(v[0].const_data_ptr());
  const int64_t size = static_cast<int64_t>(v[0].element_size());
  for (size_t s = 0; s < v.size() && s < AttentionMergeStates::kListed; ++s) {
    places.listed[s] = (reinterpret_cast<intptr_t>(v[s].const_data_ptr()) - base) / size;
  }
  places.stride = v.size() > 1 ? places.listed[1] : 0;
  return places;
}

template <typename Params, typename T, typename Storage>
void set_attention_merge_inputs(Params& p, const std::vector<at::Tensor>& o, const std::vector<at::Tensor>& lse,
                                double ln_base) {
  p.ln_base = static_cast<float>(ln_base);
  p.states = static_cast<int64_t>(o.size());
  p.rows_outer = o[0].size(0);
  p.rows_inner = o[0].size(1);
  p.head_dim = o[0].size(2);
  p.o = input_ptr<T, Storage>(o[0]);
  p.lse = lse[0].const_data_ptr<float>();
  for (int d = 0; d < 2; ++d) {
    p.o_strides[d] = o[0].stride(d);
    p.lse_strides[d] = lse[0].stride(d);
  }
  p.o_states = attention_merge_places(o);
  p.lse_states = attention_merge_places(lse);
}

// o and lse are attention_merge_states'; out (rows_outer, rows_inner, head_dim), features
// contiguous, and out_lse (rows_outer, rows_inner), as check_attention_merge_outputs checks them.
template <typename T, typename Storage>
AttentionMergeParams<T> attention_merge_params(const std::vector<at::Tensor>& o, const std::vector<at::Tensor>& lse,
                                               double ln_base, const at::Tensor& out, const at::Tensor& out_lse) {
  AttentionMergeParams<T> p{};
  set_attention_merge_inputs<AttentionMergeParams<T>, T, Storage>(p, o, lse, ln_base);
  p.out = output_ptr<T, Storage>(out);
  p.out_lse = out_lse.mutable_data_ptr<float>();
  for (int d = 0; d < 2; ++d) {
    p.out_strides[d] = out.stride(d);
    p.out_lse_strides[d] = out_lse.stride(d);
  }
  return p;
}

// Whether the memory a and b span (first to last element) meets.
inline bool attention_merge_spans_meet(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::pair<uintptr_t, uintptr_t>{first, first + static_cast<uintptr_t>((last + 1) * t.element_size())};
  };
  const auto [a_first, a_end] = span(a);
  const auto [b_first, b_end] = span(b);
  return a_first < b_end && b_first < a_end;
}

// Whether an output is one of the states (the same view: a merge in place, which the kernels allow by
// reading each row's inputs before writing it) or apart from all of them.
inline bool attention_merge_output_apart(const at::Tensor& output, const std::vector<at::Tensor>& states) {
  for (const at::Tensor& state : states) {
    const bool same = output.const_data_ptr() == state.const_data_ptr() && output.sizes() == state.sizes() &&
                      output.strides() == state.strides();
    if (!same && attention_merge_spans_meet(output, state)) return false;
  }
  return true;
}

// out (rows_outer, rows_inner, head_dim) of o's dtype, features contiguous, and out_lse (rows_outer,
// rows_inner) float32, on o's device, any other strides.
inline void check_attention_merge_outputs(at::TensorList o_in, const at::Tensor& out, const at::Tensor& out_lse) {
  const char* op = kAttentionMergeOp;
  const at::Tensor& first = o_in[0];
  TORCH_CHECK(out.sizes() == first.sizes() && out.scalar_type() == first.scalar_type() &&
                  out.device() == first.device() && (out.size(2) <= 1 || out.stride(2) == 1),
              op, ": out must be a ", first.scalar_type(), " tensor ", first.sizes(), " on ", first.device(),
              " with contiguous features, got ", out.scalar_type(), " ", out.sizes(), " strides ", out.strides(),
              " on ", out.device());
  TORCH_CHECK(out_lse.sizes() == first.sizes().slice(0, 2) && out_lse.scalar_type() == at::kFloat &&
                  out_lse.device() == first.device(),
              op, ": out_lse must be a float32 tensor ", first.sizes().slice(0, 2), " on ", first.device(), ", got ",
              out_lse.scalar_type(), " ", out_lse.sizes(), " on ", out_lse.device());
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes &&
                  at::has_internal_overlap(out_lse) != at::MemOverlap::Yes,
              op, ": out and out_lse must not have elements that share memory (expanded tensors), got strides ",
              out.strides(), " and ", out_lse.strides());
}

// grad_out and grad_lse contiguous (grad_lse may be undefined), grad_o and grad_lse_states contiguous.
template <typename T, typename Storage>
AttentionMergeBackwardParams<T> attention_merge_backward_params(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                                                const std::vector<at::Tensor>& o,
                                                                const std::vector<at::Tensor>& lse, double ln_base,
                                                                const at::Tensor& grad_o,
                                                                const at::Tensor& grad_lse_states) {
  AttentionMergeBackwardParams<T> p{};
  set_attention_merge_inputs<AttentionMergeBackwardParams<T>, T, Storage>(p, o, lse, ln_base);
  p.grad_out = input_ptr<T, Storage>(grad_out);
  p.grad_lse = grad_lse.defined() ? grad_lse.const_data_ptr<float>() : nullptr;
  p.grad_o = output_ptr<T, Storage>(grad_o);
  p.grad_lse_states = grad_lse_states.mutable_data_ptr<float>();
  return p;
}

// Runs launch(o, lse, out, out_lse) for the merge of the states (lse to base e^ln_base); returns (out, out_lse).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> run_attention_merge(at::TensorList o_in, at::TensorList lse_in, double ln_base,
                                                       const Launch& launch) {
  check_attention_merge(o_in, lse_in, ln_base);
  at::Tensor out = at::empty(o_in[0].sizes(), o_in[0].options());
  at::Tensor out_lse = at::empty(lse_in[0].sizes(), lse_in[0].options());
  if (out_lse.numel() == 0) return {out, out_lse};
  launch(attention_merge_states(o_in, true), attention_merge_states(lse_in, false), out, out_lse);
  return {out, out_lse};
}

// Runs launch(o, lse, out, out_lse) for the merge of the states into out and out_lse
// (check_attention_merge_outputs): where they lie when each is one of the states the kernels read or
// apart from them all (and the two apart), else into new tensors then copied into them.
template <typename Launch>
void run_attention_merge_out(at::TensorList o_in, at::TensorList lse_in, double ln_base, const at::Tensor& out,
                             const at::Tensor& out_lse, const Launch& launch) {
  check_attention_merge(o_in, lse_in, ln_base);
  check_attention_merge_outputs(o_in, out, out_lse);
  if (out_lse.numel() == 0) return;
  const std::vector<at::Tensor> o = attention_merge_states(o_in, true), lse = attention_merge_states(lse_in, false);
  if (attention_merge_output_apart(out, o) && attention_merge_output_apart(out, lse) &&
      attention_merge_output_apart(out_lse, o) && attention_merge_output_apart(out_lse, lse) &&
      !attention_merge_spans_meet(out, out_lse)) {
    launch(o, lse, out, out_lse);
    return;
  }
  const at::Tensor merged = at::empty(out.sizes(), out.options());
  const at::Tensor merged_lse = at::empty(out_lse.sizes(), out_lse.options());
  launch(o, lse, merged, merged_lse);
  out.copy_(merged);
  out_lse.copy_(merged_lse);
}

// Runs launch(grad_out, grad_lse, o, lse, grad_o, grad_lse_states) for the merge's backward; returns
// (grad_o, grad_lse_states), the states stacked, contiguous.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> run_attention_merge_backward(const at::Tensor& grad_out,
                                                                const std::optional<at::Tensor>& grad_lse,
                                                                at::TensorList o_in, at::TensorList lse_in,
                                                                double ln_base, const Launch& launch) {
  check_attention_merge(o_in, lse_in, ln_base);
  check_attention_merge_grads(o_in[0], grad_out, grad_lse);
  const int64_t states = static_cast<int64_t>(o_in.size());
  at::Tensor grad_o = at::empty({states, o_in[0].size(0), o_in[0].size(1), o_in[0].size(2)}, o_in[0].options());
  at::Tensor grad_lse_states = at::empty({states, o_in[0].size(0), o_in[0].size(1)}, lse_in[0].options());
  if (grad_lse_states.numel() == 0) return {grad_o, grad_lse_states};
  launch(grad_out.contiguous(), contiguous_if(grad_lse), attention_merge_states(o_in, true),
         attention_merge_states(lse_in, false), grad_o, grad_lse_states);
  return {grad_o, grad_lse_states};
}

}  // namespace genfast
