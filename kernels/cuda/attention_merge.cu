// A warp per row: every lane computes the row's merged lse from the states' (a handful of
// broadcast loads), then the lanes take the head dim's features in chunks of kVec (16 bytes where
// the pointers, strides and head dim allow it, one element otherwise). A state of lse -inf has no
// keys and is not read.
#include "attention_merge.cuh"
#include "float_conversion.cuh"
#include "vector_pack.cuh"
#include "warp_sum.cuh"
#ifndef GENFAST_EMULATED_CUDA
#include "attention_sm80.cuh"  // launch_tiles (kernels/tests/cuda_emulator.h has its own, which runs this on the host)
#endif

namespace genfast {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;

// A wide access at an unaligned address faults on a GPU; on the host emulator, which would not, it fails.
template <typename T, int kVec>
__device__ __forceinline__ void check_chunk_aligned(const T* at) {
#ifdef GENFAST_EMULATED_CUDA
  if (reinterpret_cast<uintptr_t>(at) % sizeof(Pack<T, kVec>) != 0) cuda_emulator::fail("a chunk at an unaligned address");
#else
  (void)at;
#endif
}

template <typename T, int kVec>
__device__ __forceinline__ void load_chunk(const T* from, float (&to)[kVec]) {
  check_chunk_aligned<T, kVec>(from);
  const Pack<T, kVec> chunk = *reinterpret_cast<const Pack<T, kVec>*>(from);
#pragma unroll
  for (int e = 0; e < kVec; ++e) to[e] = to_float(chunk.v[e]);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_chunk(T* to, const float (&from)[kVec]) {
  check_chunk_aligned<T, kVec>(to);
  Pack<T, kVec> chunk;
#pragma unroll
  for (int e = 0; e < kVec; ++e) chunk.v[e] = from_float<T>(from[e]);
  *reinterpret_cast<Pack<T, kVec>*>(to) = chunk;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) attention_merge_kernel(const AttentionMergeParams<T> p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= p.rows_outer * p.rows_inner) return;
  const int lane = threadIdx.x % 32;
  const AttentionMergeRow<T> row = attention_merge_row(p, r);
  const T* o = row.o;
  const float* lse = row.lse;
  const float merged = row.merged;
  T* out = p.out + attention_merge_row_offset(p.out_strides, p.rows_inner, r);
  for (int64_t c = lane * kVec; c < p.head_dim; c += 32 * kVec) {
    float acc[kVec] = {}, o_s[kVec];
    for (int64_t s = 0; s < p.states; ++s) {
      const float lse_s = lse[attention_merge_state_at(p.lse_states, s)];
      if (lse_s == -__builtin_inff()) continue;
      const float weight = attention_merge_weight(lse_s, merged, p.ln_base);
      load_chunk<T, kVec>(o + attention_merge_state_at(p.o_states, s) + c, o_s);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += weight * o_s[e];
    }
    store_chunk<T, kVec>(out + c, acc);  // the chunk this lane read: out may be one of the states
  }
  // out_lse may be one of the states' lse, which every lane reads above.
  __syncwarp();
  if (lane == 0) p.out_lse[attention_merge_row_offset(p.out_lse_strides, p.rows_inner, r)] = merged;
}

// Lane 0 parks d_s in grad_lse_states until the row's sum over the states is known.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) attention_merge_backward_kernel(const AttentionMergeBackwardParams<T> p) {
  const int64_t rows = p.rows_outer * p.rows_inner;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const AttentionMergeRow<T> row = attention_merge_row(p, r);
  const T* o = row.o;
  const float* lse = row.lse;
  const float merged = row.merged;
  const T* grad_out = p.grad_out + r * p.head_dim;
  float mean = 0.0f;
  for (int64_t s = 0; s < p.states; ++s) {
    const float lse_s = lse[attention_merge_state_at(p.lse_states, s)];
    const bool empty = lse_s == -__builtin_inff();
    const float weight = empty ? 0.0f : attention_merge_weight(lse_s, merged, p.ln_base);
    T* grad_o = p.grad_o + (s * rows + r) * p.head_dim;
    float dot = 0.0f;
#pragma unroll 1  // unrolled, the float32 kernel spilled a register on sm_90a
    for (int64_t c = lane * kVec; c < p.head_dim; c += 32 * kVec) {
      float g[kVec], o_s[kVec] = {}, scaled[kVec];
      load_chunk<T, kVec>(grad_out + c, g);
      if (!empty) load_chunk<T, kVec>(o + attention_merge_state_at(p.o_states, s) + c, o_s);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        dot += g[e] * o_s[e];
        scaled[e] = empty ? 0.0f : weight * g[e];
      }
      store_chunk<T, kVec>(grad_o + c, scaled);
    }
    dot = warp_sum(dot);
    if (empty) dot = 0.0f;  // g . 0 is NaN where g is infinite
    mean += weight * dot;
    if (lane == 0) p.grad_lse_states[s * rows + r] = dot;
  }
  if (lane != 0) return;
  const float grad_lse = p.grad_lse == nullptr ? 0.0f : p.grad_lse[r];
  for (int64_t s = 0; s < p.states; ++s) {
    const float lse_s = lse[attention_merge_state_at(p.lse_states, s)];
    float& out = p.grad_lse_states[s * rows + r];
    out = lse_s == -__builtin_inff()
              ? 0.0f
              : attention_merge_lse_grad(attention_merge_weight(lse_s, merged, p.ln_base), out, mean, grad_lse,
                                         p.ln_base);
  }
}

// 16-byte chunks where every row a kernel reads or writes starts on one.
template <typename T, typename Params>
bool chunks_fit(const Params& p, const void* const* pointers, int count) {
  constexpr int64_t vec = 16 / sizeof(T);
  bool fit = p.head_dim % vec == 0 && p.o_strides[0] % vec == 0 && p.o_strides[1] % vec == 0 &&
             p.o_states.stride % vec == 0;
  for (int s = 0; s < AttentionMergeStates::kListed; ++s) fit = fit && p.o_states.listed[s] % vec == 0;
  for (int i = 0; i < count; ++i) fit = fit && reinterpret_cast<uintptr_t>(pointers[i]) % 16 == 0;
  return fit;
}

template <typename Params>
int64_t row_blocks(const Params& p) {
  return p.states == 0 ? 0 : (p.rows_outer * p.rows_inner + kRowsPerBlock - 1) / kRowsPerBlock;
}

}  // namespace

template <typename T>
cudaError_t launch_attention_merge(const AttentionMergeParams<T>& p, cudaStream_t stream) {
  const void* pointers[] = {p.o, p.out};
  if (chunks_fit<T>(p, pointers, 2) && p.out_strides[0] % (16 / sizeof(T)) == 0 &&
      p.out_strides[1] % (16 / sizeof(T)) == 0) {
    return attention_cuda::launch_tiles(attention_merge_kernel<T, 16 / sizeof(T)>, row_blocks(p), kThreads, 0, stream,
                                        p);
  }
  return attention_cuda::launch_tiles(attention_merge_kernel<T, 1>, row_blocks(p), kThreads, 0, stream, p);
}

template <typename T>
cudaError_t launch_attention_merge_backward(const AttentionMergeBackwardParams<T>& p, cudaStream_t stream) {
  const void* pointers[] = {p.o, p.grad_out, p.grad_o};
  if (chunks_fit<T>(p, pointers, 3)) {
    return attention_cuda::launch_tiles(attention_merge_backward_kernel<T, 16 / sizeof(T)>, row_blocks(p), kThreads,
                                        0, stream, p);
  }
  return attention_cuda::launch_tiles(attention_merge_backward_kernel<T, 1>, row_blocks(p), kThreads, 0, stream, p);
}

template cudaError_t launch_attention_merge<float>(const AttentionMergeParams<float>&, cudaStream_t);
template cudaError_t launch_attention_merge<__half>(const AttentionMergeParams<__half>&, cudaStream_t);
template cudaError_t launch_attention_merge<__nv_bfloat16>(const AttentionMergeParams<__nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_attention_merge_backward<float>(const AttentionMergeBackwardParams<float>&, cudaStream_t);
template cudaError_t launch_attention_merge_backward<__half>(const AttentionMergeBackwardParams<__half>&,
                                                             cudaStream_t);
template cudaError_t launch_attention_merge_backward<__nv_bfloat16>(const AttentionMergeBackwardParams<__nv_bfloat16>&,
                                                                    cudaStream_t);

}  // namespace genfast
