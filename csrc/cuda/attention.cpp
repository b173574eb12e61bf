// genfast::attention_forward, attention_backward and their varlen forms on CUDA: checks (the shared
// ones of attention_args.h), device guard, current stream, then the tensor-core kernels of
// kernels/cuda/attention.cuh, which read and write float16 or bfloat16 (float32 runs in Triton).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "launch.h"

#include "../../kernels/cuda/attention.cuh"
#include "../attention_args.h"

namespace genfast {
namespace {

constexpr const char* kAttentionBackwardOp = "genfast.attention_backward";
constexpr const char* kAttentionVarlenBackwardOp = "genfast.attention_varlen_backward";

// The batches of a chunk of dS where the kernels sum it to a mask's smaller shape (summed_floats
// elements): a float32 (batches, H, Lq, Lk) buffer of at most 64 MiB, or of summed_floats where that
// is more; one batch at least. Triton's launcher takes the same rule (MASK_GRAD_CHUNK_FLOATS).
int64_t attention_mask_grad_chunk_batches(const std::vector<int64_t>& full, int64_t summed_floats) {
  constexpr int64_t kChunkFloats = int64_t{1} << 24;
  const int64_t per_batch = std::max<int64_t>(full[1] * full[2] * full[3], 1);
  return std::clamp<int64_t>(std::max(kChunkFloats, summed_floats) / per_batch, 1, std::max<int64_t>(full[0], 1));
}

void check_cuda_attention(const char* op, const AttentionTensors& t) {
  const auto dtype = t.q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": the CUDA kernels take float16 or bfloat16, got q of dtype ", dtype,
              " (impl='triton' runs float32)");
  TORCH_CHECK(t.q.size(-1) <= kAttentionCudaMaxHeadDim && t.v.size(-1) <= kAttentionCudaMaxHeadDim, op,
              ": the CUDA kernels take head dims up to ", kAttentionCudaMaxHeadDim, ", got ", t.q.size(-1), " and ",
              t.v.size(-1));
  int major = 0, minor = 0;
  const int device = t.q.get_device();
  TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess,
              op, ": cannot read the compute capability of cuda:", device);
  TORCH_CHECK(major >= 8, op, ": the CUDA kernels need compute capability 8.0 or later, got ", major, ".", minor,
              " (impl='triton' runs there)");
  if (t.cu_seqlens_q.defined()) {  // the kernels' grids come from max_seqlen, never from cu_seqlens
    TORCH_CHECK(t.q.size(0) == 0 || t.max_seqlen_q > 0, op, ": max_seqlen_q must be > 0 when q has rows");
    // Paged, k is the pool of pages, which may hold some while every sequence is empty.
    const bool no_keys = t.block_table.defined() ? t.block_table.size(1) == 0 : t.k.size(0) == 0;
    TORCH_CHECK(no_keys || t.max_seqlen_k > 0, op,
                ": max_seqlen_k must be > 0 when k has rows (with block_table: when its rows name pages)");
  }
}

// fn(T{}) for the CUDA element type of a float16 or bfloat16 tensor.
template <typename Fn>
void dispatch_half_types(at::ScalarType dtype, Fn fn) {
  if (dtype == at::kHalf) {
    fn(__half{});
  } else {
    fn(__nv_bfloat16{});
  }
}

template <typename T>
AttentionCudaParams<T> cuda_params(const AttentionTensors& t, const AttentionParams& base, const at::Tensor& o) {
  AttentionCudaParams<T> params{};
  params.base = base;
  params.q = reinterpret_cast<const T*>(t.q.const_data_ptr());
  params.k = reinterpret_cast<const T*>(t.k.const_data_ptr());
  params.v = reinterpret_cast<const T*>(t.v.const_data_ptr());
  params.o = o.defined() ? reinterpret_cast<T*>(o.mutable_data_ptr()) : nullptr;
  return params;
}

// o (q's dtype, q's shape with v's head dim, contiguous) and lse float32: (B, H, Lq), varlen (H, total_q).
std::tuple<at::Tensor, at::Tensor> forward(const char* op, const AttentionTensors& t, double scale, double softcap,
                                           int64_t band_lo, int64_t band_hi, double dropout_p, int64_t seed,
                                           int64_t offset) {
  check_attention_options(scale, softcap, dropout_p, t.block_table.defined());
  check_cuda_attention(op, t);
  const bool varlen = t.cu_seqlens_q.defined();
  std::vector<int64_t> o_shape(t.q.sizes().begin(), t.q.sizes().end());
  o_shape.back() = t.v.size(-1);
  at::Tensor o = at::empty(o_shape, t.q.options());
  const auto floats = t.q.options().dtype(at::kFloat);
  at::Tensor lse = varlen ? at::empty({t.q.size(1), t.q.size(0)}, floats)
                          : at::empty({t.q.size(0), t.q.size(1), t.q.size(2)}, floats);
  if (lse.numel() == 0) return {o, lse};
  const AttentionParams base = attention_params(t, scale, softcap, band_lo, band_hi, dropout_p, seed, offset, o, lse);
  // Few tiles (decoding, small batches) stack a group's heads and split the keys; the partial
  // results take a workspace from the caching allocator, so a CUDA graph can capture the call.
  int multiprocessors = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, t.q.get_device()) ==
                  cudaSuccess,
              op, ": cannot read the multiprocessor count of cuda:", t.q.get_device());
  const AttentionForwardPlan plan = plan_attention_forward(base, multiprocessors);
  const int64_t workspace_floats = attention_forward_workspace(base, plan);
  const at::Tensor workspace = workspace_floats > 0 ? at::empty({workspace_floats}, floats) : at::Tensor();
  float* workspace_data = workspace.defined() ? workspace.mutable_data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_half_types(t.q.scalar_type(), [&](auto type) {
    using T = decltype(type);
    check_launch(op, launch_attention_forward<T>(cuda_params<T>(t, base, o), plan, workspace_data, stream));
  });
  return {o, lse};
}

// A dense forward with o in float32 (which rounds bit for bit to the o of the same tiles), and lse: the
// backward's delta for a mask's gradient takes it (csrc/cpu/attention.cpp's backward says why). Views
// of one workspace; the sm_80 kernels without splits.
std::tuple<at::Tensor, at::Tensor> float_forward(const char* op, const AttentionTensors& t, double scale,
                                                 double softcap, int64_t band_lo, int64_t band_hi, double dropout_p,
                                                 int64_t seed, int64_t offset) {
  const AttentionParams base = attention_params(t, scale, softcap, band_lo, band_hi, dropout_p, seed, offset,
                                                at::Tensor(), at::Tensor());
  AttentionForwardPlan plan;
  plan.float_o = true;
  const int64_t rows = attention_lse_rows(base);
  const at::Tensor workspace = at::empty({attention_forward_workspace(base, plan)}, t.q.options().dtype(at::kFloat));
  if (rows > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_half_types(t.q.scalar_type(), [&](auto type) {
      using T = decltype(type);
      check_launch(op, launch_attention_forward<T>(cuda_params<T>(t, base, at::Tensor()), plan,
                                                    workspace.mutable_data_ptr<float>(), stream));
    });
  }
  // The rows' lse, then o's rows, in their order (b, h, i): lse (B, H, Lq), o (B, H, Lq, Dv).
  return {workspace.narrow(0, rows, rows * t.v.size(3)).view({t.q.size(0), t.q.size(1), t.q.size(2), t.v.size(3)}),
          workspace.narrow(0, 0, rows).view({t.q.size(0), t.q.size(1), t.q.size(2)})};
}

// delta_r = grad_o_r . o_r - grad_lse_r, float32 in lse's layout, for the backward's kernels: by
// launch_attention_row_deltas, from grad_o and o in their dtypes (o in T, or the float32 o of a
// recompute), with no float32 copies of them.
at::Tensor row_deltas(const char* op, const at::Tensor& grad_o, const at::Tensor& o,
                      const std::optional<at::Tensor>& grad_lse, const at::Tensor& lse, bool varlen) {
  at::Tensor delta = at::empty(lse.sizes(), lse.options().dtype(at::kFloat));
  if (delta.numel() == 0) return delta;
  // Rows as (batch, head, position): packed (total, H, Dv) ones as one batch of (H, total).
  const auto as_rows = [varlen](const at::Tensor& t) {
    const at::Tensor rows = t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous();
    return varlen ? rows.transpose(0, 1).unsqueeze(0) : rows;
  };
  const at::Tensor g = as_rows(grad_o);
  const at::Tensor x = as_rows(o.scalar_type() == at::kFloat ? o : o.to(grad_o.scalar_type()));
  const at::Tensor lse_grad = grad_lse ? grad_lse->to(at::kFloat).contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_half_types(g.scalar_type(), [&](auto type) {
    using T = decltype(type);
    const auto launch = [&](const auto* o_data) {
      using O = std::remove_const_t<std::remove_pointer_t<decltype(o_data)>>;
      AttentionRowDeltasParams<T, O> p{};
      p.grad_o = reinterpret_cast<const T*>(g.const_data_ptr());
      p.o = o_data;
      p.grad_lse = lse_grad.defined() ? lse_grad.const_data_ptr<float>() : nullptr;
      p.delta = delta.mutable_data_ptr<float>();
      p.batches = g.size(0);
      p.heads = g.size(1);
      p.length = g.size(2);
      p.v_dim = g.size(3);
      for (int d = 0; d < 3; ++d) {
        p.grad_o_stride[d] = g.stride(d);
        p.o_stride[d] = x.stride(d);
      }
      check_launch(op, launch_attention_row_deltas<T, O>(p, stream));
    };
    if (x.scalar_type() == at::kFloat) {
      launch(x.const_data_ptr<float>());
    } else {
      launch(reinterpret_cast<const T*>(x.const_data_ptr()));
    }
  });
  return delta;
}

// grad_q, grad_k, grad_v in the inputs' dtype (contiguous, in q's, k's, v's shapes) and, with
// grad_mask, the mask's gradient (attention_mask_grad) from dS in AttentionTensors::mask_grad_shape,
// summed in float32 by the kernels over the batches, heads and queries the mask broadcasts over,
// chunks of batches at a time (attention_mask_grad_chunk_batches); with sinks, theirs.
AttentionBackwardResult backward(
    const char* op, const AttentionTensors& t, const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& o, const at::Tensor& lse, double scale, double softcap, int64_t band_lo, int64_t band_hi,
    double dropout_p, int64_t seed, int64_t offset, bool grad_mask, bool deterministic) {
  check_attention_options(scale, softcap, dropout_p);
  check_cuda_attention(op, t);
  const bool varlen = t.cu_seqlens_q.defined();
  const at::Tensor o_for_delta =
      grad_mask && o.scalar_type() != at::kFloat
          ? std::get<0>(float_forward(op, t, scale, softcap, band_lo, band_hi, dropout_p, seed, offset))
          : o;
  const AttentionGradInputs in =
      prepare_attention_grads(op, t, grad_o.to(t.q.scalar_type()), grad_lse, o_for_delta, lse, /*as_float=*/false);
  const at::Tensor delta = row_deltas(op, in.grad_o, o_for_delta, grad_lse, in.lse, varlen);
  // The kernels write every row of every sequence; varlen rows outside all sequences (cu_seqlens
  // not reaching total) stay zero.
  const auto make = [varlen](const at::Tensor& like) {
    return varlen ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
  };
  at::Tensor grad_q = make(t.q), grad_k = make(t.k), grad_v = make(t.v);
  at::Tensor grad_s, ds_chunk, dq_accum;
  const std::vector<int64_t> full{t.q.size(0), t.q.size(1), t.q.size(2), t.k.size(2)};
  const std::vector<int64_t> mask_shape = t.mask_grad_shape.empty() ? full : t.mask_grad_shape;
  int64_t chunk_batches = 0;
  if (grad_mask) {
    grad_s = at::zeros(mask_shape, t.q.options().dtype(at::kFloat));
    if (mask_shape != full) {
      chunk_batches = attention_mask_grad_chunk_batches(full, grad_s.numel());
      ds_chunk = at::zeros({chunk_batches, full[1], full[2], full[3]}, grad_s.options());
    }
  } else if (!deterministic && grad_q.numel() > 0 && t.k.numel() > 0) {
    dq_accum = at::zeros(t.q.sizes(), t.q.options().dtype(at::kFloat));  // dQ added with atomics
  }
  if (grad_q.numel() > 0 || grad_k.numel() > 0 || grad_v.numel() > 0) {
    AttentionParams base = attention_params(t, scale, softcap, band_lo, band_hi, dropout_p, seed, offset,
                                            at::Tensor(), at::Tensor());
    base.lse = const_cast<float*>(in.lse.const_data_ptr<float>());  // read only by the backward
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_half_types(t.q.scalar_type(), [&](auto type) {
      using T = decltype(type);
      AttentionCudaGrads<T> grads{};
      grads.grad_o = reinterpret_cast<const T*>(in.grad_o.const_data_ptr());
      grads.delta = delta.const_data_ptr<float>();
      grads.grad_q = reinterpret_cast<T*>(grad_q.mutable_data_ptr());
      grads.grad_k = reinterpret_cast<T*>(grad_k.mutable_data_ptr());
      grads.grad_v = reinterpret_cast<T*>(grad_v.mutable_data_ptr());
      if (grad_mask) {
        grads.grad_s = grad_s.mutable_data_ptr<float>();
        grads.grad_s_batches = mask_shape[0];
        grads.grad_s_heads = mask_shape[1];
        grads.grad_s_rows = mask_shape[2];
        grads.ds_chunk = ds_chunk.defined() ? ds_chunk.mutable_data_ptr<float>() : nullptr;
        grads.ds_chunk_batches = chunk_batches;
      }
      grads.dq_accum = dq_accum.defined() ? dq_accum.mutable_data_ptr<float>() : nullptr;
      check_launch(op, launch_attention_backward<T>(cuda_params<T>(t, base, at::Tensor()), grads, stream));
    });
  }
  std::optional<at::Tensor> mask_grad;
  if (grad_mask) mask_grad = attention_mask_grad(t, grad_s);
  return {grad_q, grad_k, grad_v, mask_grad, attention_sink_grad(t, delta, in.lse)};
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const std::optional<at::Tensor>& attn_mask,
                                                          const std::optional<at::Tensor>& alibi_slopes, double scale,
                                                          double softcap, int64_t band_lo, int64_t band_hi,
                                                          double dropout_p, int64_t seed, int64_t offset,
                                                          bool /*deterministic*/, bool float_o,
                                                          const std::optional<at::Tensor>& sinks,
                                                          const std::optional<at::Tensor>& qv) {
  TORCH_CHECK(!qv, kAttentionOp,
              ": the CUDA kernels take no qv; genfast.attention runs it on Triton's forward, or as attention of "
              "cat(q, qv) over cat(k, v)");
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionTensors t = prepare_attention(q, k, v, attn_mask, alibi_slopes, /*as_float=*/false);
  set_attention_sinks(kAttentionOp, t, sinks, q.size(1), q);
  if (!float_o) return forward(kAttentionOp, t, scale, softcap, band_lo, band_hi, dropout_p, seed, offset);
  check_attention_options(scale, softcap, dropout_p);
  check_cuda_attention(kAttentionOp, t);
  return float_forward(kAttentionOp, t, scale, softcap, band_lo, band_hi, dropout_p, seed, offset);
}

AttentionBackwardResult attention_backward_cuda(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t band_lo, int64_t band_hi,
    double dropout_p, int64_t seed, int64_t offset, bool grad_mask, bool deterministic,
    const std::optional<at::Tensor>& sinks) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionTensors t = prepare_attention(q, k, v, attn_mask, alibi_slopes, /*as_float=*/false);
  set_attention_sinks(kAttentionBackwardOp, t, sinks, q.size(1), q);
  return backward(kAttentionBackwardOp, t, grad_o, grad_lse, o, lse, scale, softcap, band_lo, band_hi, dropout_p, seed,
                  offset, grad_mask, deterministic);
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t band_lo, int64_t band_hi,
    double dropout_p, int64_t seed, int64_t offset, bool /*deterministic*/, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& seqused_k, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& qv) {
  TORCH_CHECK(!qv, kAttentionVarlenOp,
              ": the CUDA kernels take no qv; genfast.attention_varlen runs it on Triton's forward, or as attention "
              "of cat(q, qv) over cat(k, v)");
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionTensors t = prepare_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                alibi_slopes, seqused_k, block_table, /*as_float=*/false);
  set_attention_sinks(kAttentionVarlenOp, t, sinks, q.size(1), q);
  return forward(kAttentionVarlenOp, t, scale, softcap, band_lo, band_hi, dropout_p, seed, offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> attention_varlen_backward_cuda(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t band_lo, int64_t band_hi,
    double dropout_p, int64_t seed, int64_t offset, bool deterministic, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& seqused_k) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionTensors t = prepare_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                alibi_slopes, seqused_k, std::nullopt, /*as_float=*/false);
  set_attention_sinks(kAttentionVarlenBackwardOp, t, sinks, q.size(1), q);
  auto [grad_q, grad_k, grad_v, no_mask_grad, grad_sinks] =
      backward(kAttentionVarlenBackwardOp, t, grad_o, grad_lse, o, lse, scale, softcap, band_lo, band_hi, dropout_p,
               seed, offset, false, deterministic);
  return {grad_q, grad_k, grad_v, grad_sinks};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("attention_varlen_forward", &attention_varlen_forward_cuda);
  m.impl("attention_varlen_backward", &attention_varlen_backward_cuda);
}

}  // namespace genfast
