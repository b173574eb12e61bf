#include "affine_coupling.cuh"
#include "block_reduce.cuh"
#include "vector_access.cuh"

namespace genfast {
namespace {

constexpr int kCouplingThreads = 256;

// Rows on the grid's x dimension, chunks of a row on y; each thread takes groups of four
// consecutive elements, whose t and u it reads through the index.
template <typename T>
__global__ void affine_coupling_kernel(AffineCouplingParams<T> p, bool vector_ok) {
  const CouplingLayout layout = p.layout;  // a copy: in registers, not read through the parameters
  const int64_t row = blockIdx.x, chunk = blockIdx.y;
  const int64_t begin = chunk * p.chunk_size;
  const int64_t end = begin + p.chunk_size < layout.row_size ? begin + p.chunk_size : layout.row_size;
  const T* x_row = p.x + row * p.x_stride;
  const T* t_row = p.shift + row * p.shift_stride;
  const T* u_row = p.scale + row * p.scale_stride;
  T* y_row = p.y + row * layout.row_size;
  float log_sum = 0.0f;
  for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * blockDim.x) {
    const int count = end - i < 4 ? static_cast<int>(end - i) : 4;
    float x[4], y[4];
    load_group(x_row, i, count, vector_ok, x);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      y[k] = x[k];
      const int32_t j = k < count ? __ldg(layout.index + i + k) : -1;
      if (j < 0) continue;
      if (j >= layout.transformed) {
        y[k] = __int_as_float(0x7fffffff);
        continue;
      }
      const ScaleTerms s = scale_terms(p.fn, p.scale_param, to_float(u_row[j]));
      y[k] = coupling_value(s, x[k], to_float(t_row[j]), p.glow_order, p.inverse);
      log_sum += s.log_scale;
    }
    store_group(y_row, i, count, vector_ok, y);
  }
  const float sum = block_sum(log_sum);
  if (threadIdx.x == 0) p.partial[row * p.num_chunks + chunk] = p.inverse ? -sum : sum;
}

template <typename T>
__global__ void affine_coupling_backward_kernel(AffineCouplingBackwardParams<T> p, int64_t chunk_size,
                                                bool vector_ok) {
  const CouplingLayout layout = p.layout;  // a copy: in registers, not read through the parameters
  const int64_t row = blockIdx.x, chunk = blockIdx.y;
  const int64_t begin = chunk * chunk_size;
  const int64_t end = begin + chunk_size < layout.row_size ? begin + chunk_size : layout.row_size;
  const T* x_row = p.x + row * p.x_stride;
  const T* g_row = p.grad_y + row * p.grad_y_stride;
  const T* t_row = p.shift + row * p.shift_stride;
  const T* u_row = p.scale + row * p.scale_stride;
  T* gx_row = p.grad_x + row * layout.row_size;
  T* gt_row = p.grad_shift + row * layout.transformed;
  T* gu_row = p.grad_scale + row * layout.transformed;
  const float g_logdet = p.grad_logdet[row];
  for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * blockDim.x) {
    const int count = end - i < 4 ? static_cast<int>(end - i) : 4;
    float x[4], g[4], gx[4];
    load_group(x_row, i, count, vector_ok, x);
    load_group(g_row, i, count, vector_ok, g);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      gx[k] = g[k];
      if (k >= count) continue;
      const int32_t j = __ldg(layout.index + i + k);
      if (j < 0 || j >= layout.transformed) {
        if (layout.full) {
          gt_row[i + k] = from_float<T>(0.0f);
          gu_row[i + k] = from_float<T>(0.0f);
        }
        continue;
      }
      const ScaleTerms s = scale_terms(p.fn, p.scale_param, to_float(u_row[j]));
      const CouplingGrads r = coupling_grads(s, x[k], to_float(t_row[j]), g[k], g_logdet, p.glow_order, p.inverse);
      gx[k] = r.x;
      gt_row[j] = from_float<T>(r.shift);
      gu_row[j] = from_float<T>(r.scale);
    }
    store_group(gx_row, i, count, vector_ok, gx);
  }
}

constexpr int64_t kBackwardChunk = 1 << 14;

inline int64_t num_chunks(int64_t row_size, int64_t chunk_size) {
  return row_size == 0 ? 1 : (row_size + chunk_size - 1) / chunk_size;
}

}  // namespace

template <typename T>
cudaError_t launch_affine_coupling(const AffineCouplingParams<T>& p, cudaStream_t stream) {
  const CouplingLayout& layout = p.layout;
  if (layout.rows == 0) return cudaSuccess;
  const bool vector_ok = aligned4(p.x) && aligned4(p.y) && p.x_stride % 4 == 0 && layout.row_size % 4 == 0;
  const dim3 grid(static_cast<unsigned>(layout.rows), static_cast<unsigned>(p.num_chunks));
  affine_coupling_kernel<T><<<grid, kCouplingThreads, 0, stream>>>(p, vector_ok);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_affine_coupling_backward(const AffineCouplingBackwardParams<T>& p, cudaStream_t stream) {
  const CouplingLayout& layout = p.layout;
  if (layout.rows == 0 || layout.row_size == 0) return cudaSuccess;
  const bool vector_ok = aligned4(p.x) && aligned4(p.grad_y) && aligned4(p.grad_x) && p.x_stride % 4 == 0 &&
                         p.grad_y_stride % 4 == 0 && layout.row_size % 4 == 0;
  const dim3 grid(static_cast<unsigned>(layout.rows),
                  static_cast<unsigned>(num_chunks(layout.row_size, kBackwardChunk)));
  affine_coupling_backward_kernel<T><<<grid, kCouplingThreads, 0, stream>>>(p, kBackwardChunk, vector_ok);
  return cudaGetLastError();
}

#define GENFAST_INSTANTIATE_COUPLING(T)                                                                         \
  template cudaError_t launch_affine_coupling<T>(const AffineCouplingParams<T>&, cudaStream_t);                \
  template cudaError_t launch_affine_coupling_backward<T>(const AffineCouplingBackwardParams<T>&, cudaStream_t);
GENFAST_INSTANTIATE_COUPLING(float)
GENFAST_INSTANTIATE_COUPLING(__half)
GENFAST_INSTANTIATE_COUPLING(__nv_bfloat16)
#undef GENFAST_INSTANTIATE_COUPLING

}  // namespace genfast
