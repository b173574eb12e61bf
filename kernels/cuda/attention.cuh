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
  float* grad_s;         // dense only: (B, H, Lq, Lk) float32, zero-initialized, or null: dL/ds
};

// o and lse. Needs 1 <= max(dim, v_dim) <= 256 (0 is fine too); runs on `stream`, never
// synchronizes; returns the launch's error (or cudaErrorInvalidValue for unsupported sizes).
template <typename T>
cudaError_t launch_attention_forward(const AttentionCudaParams<T>& params, cudaStream_t stream);

// grad_q, grad_k, grad_v (and grad_s): two deterministic kernels, no atomics.
template <typename T>
cudaError_t launch_attention_backward(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                                      cudaStream_t stream);

}  // namespace genfast
