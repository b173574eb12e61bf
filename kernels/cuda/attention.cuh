// Launchers of scaled-dot-product attention on CUDA (kernels/common/attention.h defines it):
// FlashAttention-2 style tensor-core kernels (mma.sync m16n8k16, float16 or bfloat16 operands,
// float32 accumulators) for sm_80 and later; framework-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/attention.h"

namespace genfast {

constexpr int kAttentionCudaMaxHeadDim = 256;

// T is __half or __nv_bfloat16. `base` holds the sizes, strides (in elements), options, the key
// and lse; its float pointers q, k, v and o are unused: the typed pointers below replace them.
template <typename T>
struct AttentionCudaParams {
  AttentionParams base;
  const T* q;  // strides base.q_stride, head dim contiguous; likewise k and v
  const T* k;
  const T* v;
  T* o;  // forward: rows AttentionSequence::out_row(h, i) of v_dim, contiguous
};

// The backward's inputs beside the forward's (base.lse: the forward's lse, read only) and its
// outputs, written in full (every row of every sequence) in the inputs' dtype, contiguous.
template <typename T>
struct AttentionCudaGrads {
  const T* grad_o;       // o's layout: rows out_row(h, i) of v_dim
  const float* delta;    // lse's layout: rowsum(grad_o * o) - grad_lse
  T* grad_q;             // rows out_row(h, i) of dim
  T* grad_k;             // rows key_out_row(hk, j) of dim
  T* grad_v;             // rows key_out_row(hk, j) of v_dim
  // Null, or dL/ds (dense inputs only), float32, zero-initialized, of (grad_s_batches, grad_s_heads,
  // grad_s_rows, Lk): each the whole of B, H and Lq or 1, dS being summed over the dims of 1. Summed
  // dS is computed ds_chunk_batches whole batches at a time into ds_chunk, float32, zero-initialized,
  // of (ds_chunk_batches, H, Lq, Lk), and added to grad_s in batch order (ds_chunk zeroed again).
  float* grad_s;
  int64_t grad_s_batches, grad_s_heads, grad_s_rows;
  float* ds_chunk;
  int64_t ds_chunk_batches;
  // The dS row (lse_row) at grad_s[0]: set by the launcher for a chunk, 0 otherwise.
  int64_t grad_s_row0;
  // Null: dQ comes from its own kernel (deterministic). Else grad_q's layout in float32,
  // zero-initialized: the key-block kernel adds its partial dQ there with atomics (5 products per
  // block instead of 7, bits varying from run to run), and a last kernel casts it to grad_q. Used
  // when grad_s is null, by every kernel but the Hopper cp.async one's non-plain d128 variant.
  float* dq_accum;
};

// How the forward spreads a call over the GPU. A tile of 64 query rows may stack heads_per_cta
// query heads of one kv head (a few queries each, as in decoding), so that each key block is read
// once for all of them; each tile's key blocks may be split over `splits` CTAs, whose partial
// results (float32, in a workspace) a second kernel combines, so that a few tiles still fill the GPU.
// float_o (one split only) writes o in float32, to the workspace as a split would, instead of o and
// lse: the backward's delta for a mask's gradient takes it (csrc/cpu/attention.cpp's backward says why),
// and the general kernels then take P V with P in two parts of the input type (ForwardPartials).
struct AttentionForwardPlan {
  int heads_per_cta = 1;  // 1 .. min(heads / kv_heads, 64)
  int splits = 1;         // 1 .. kAttentionMaxSplits
  bool float_o = false;
};
constexpr int kAttentionMaxSplits = 128;
constexpr int kAttentionPackedStack = 16;  // heads a packed batch's plan stacks at most

// The plan for a GPU of `multiprocessors` SMs: stack the heads of a group when their queries fit a
// tile (for packed sequences always, up to kAttentionPackedStack heads), split the keys when the
// tiles fill less than 80% of two CTAs per SM (as FlashAttention-2's split-KV heuristic does).
AttentionForwardPlan plan_attention_forward(const AttentionParams& p, int multiprocessors);

// The float32 workspace a plan needs: splits x (lse rows) x (v_dim + 1) with splits or float_o
// (its lse rows first, then o's rows of v_dim, in lse's row order), else 0.
int64_t attention_forward_workspace(const AttentionParams& p, const AttentionForwardPlan& plan);

// o and lse. Needs 1 <= max(dim, v_dim) <= 256 (0 is fine too) and a workspace of
// attention_forward_workspace floats (unused and may be null without splits); runs on `stream`,
// never synchronizes; returns the launch's error (or cudaErrorInvalidValue for unsupported sizes or
// plans).
template <typename T>
cudaError_t launch_attention_forward(const AttentionCudaParams<T>& params, const AttentionForwardPlan& plan,
                                     float* workspace, cudaStream_t stream);

// grad_q, grad_k, grad_v (and grad_s): two deterministic kernels without atomics, or (grads.dq_accum
// given) the key-block kernel adding dQ with atomics, then a cast.
template <typename T>
cudaError_t launch_attention_backward(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                                      cudaStream_t stream);

// The backward's delta_r = grad_o_r . o_r - grad_lse_r (AttentionCudaGrads::delta) for the rows r =
// (b, h, position) of (batches, heads, length) in that order: lse's layout, packed sequences being
// one batch of total_q positions. grad_o and o have their head dim contiguous and element strides
// over (batch, head, position); o is T, or float32 where the forward kept it so. The products are
// summed in float32; grad_lse (contiguous in lse's layout) may be null: 0.
template <typename T, typename O>
struct AttentionRowDeltasParams {
  const T* grad_o;
  const O* o;
  const float* grad_lse;
  float* delta;  // contiguous
  int64_t batches, heads, length, v_dim;
  int64_t grad_o_stride[3], o_stride[3];
};

template <typename T, typename O>
cudaError_t launch_attention_row_deltas(const AttentionRowDeltasParams<T, O>& p, cudaStream_t stream);

}  // namespace genfast
