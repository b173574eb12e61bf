#include "float_conversion.cuh"
#include "rotary.cuh"
#ifndef GENFAST_EMULATED_CUDA
#include "attention_sm80.cuh"  // launch_tiles (kernels/tests/cuda_emulator.h has its own, which runs this on the host)
#endif

namespace genfast {
namespace {

constexpr int kThreads = 256;

// One thread per plane of a head (both its features read, then both written, so out may be x) and,
// when out is not x, per feature past the planes; consecutive threads take consecutive planes.
template <typename T>
__global__ void rotary_kernel(RotaryParams<T> p, int64_t items_per_head, int64_t items) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= items) return;
  const int64_t w = item % items_per_head, head_item = item / items_per_head;
  const int64_t h = head_item % p.heads, token = head_item / p.heads;
  const int64_t b = token / p.seqlen, i = token % p.seqlen;
  const T* in = p.x + b * p.x_strides[0] + i * p.x_strides[1] + h * p.x_strides[2];
  T* to = p.out + b * p.out_strides[0] + i * p.out_strides[1] + h * p.out_strides[2];
  if (w >= p.half) {
    const int64_t j = w + p.half;  // past the planes: copied
    to[j] = in[j];
    return;
  }
  int64_t first, second;
  rotary_plane(w, p.half, p.interleaved, &first, &second);
  const int64_t position = rotary_position(p, b, i);
  const bool in_table = rotary_in_table(p, position);
  const int64_t row = position * p.table_stride + w;
  float y1, y2;
  rotary_turn(to_float(in[first]), to_float(in[second]), in_table ? to_float(p.cos[row]) : 1.0f,
              in_table ? rotary_sine(to_float(p.sin[row]), p.inverse) : 0.0f, &y1, &y2);
  to[first] = from_float<T>(y1);
  to[second] = from_float<T>(y2);
}

}  // namespace

template <typename T>
cudaError_t launch_rotary(const RotaryParams<T>& p, cudaStream_t stream) {
  const int64_t items_per_head = p.half + (p.copy_rest ? p.head_dim - 2 * p.half : 0);
  const int64_t items = p.batch * p.seqlen * p.heads * items_per_head;
  if (items == 0) return cudaSuccess;
  return attention_cuda::launch_tiles(rotary_kernel<T>, (items + kThreads - 1) / kThreads, kThreads, 0, stream, p,
                                      items_per_head, items);
}

template cudaError_t launch_rotary<float>(const RotaryParams<float>&, cudaStream_t);
template cudaError_t launch_rotary<__half>(const RotaryParams<__half>&, cudaStream_t);
template cudaError_t launch_rotary<__nv_bfloat16>(const RotaryParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace genfast
