// What the CUDA bindings share: the launch check, and the dispatch from a tensor's dtype to the
// CUDA element type the kernels take.
#pragma once

#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/ATen.h>

namespace genfast {

inline void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(status));
}

// Kernels that put a sample's chunks (or a layer's feature tiles) on grid.y, which stops at 65535:
// `what`, `size` in chunks of `chunk`, must fit, else the error names the limit.
inline void check_grid_y(const char* op, const char* what, int64_t size, int64_t chunk) {
  constexpr int64_t kMostBlocksY = 65535;
  TORCH_CHECK((size + chunk - 1) / chunk <= kMostBlocksY, op, ": on a GPU, ", what, " must be at most ",
              kMostBlocksY * chunk, ", got ", size);
}

// fn(T{}, Storage{}) for the CUDA element type T and the tensor's element type Storage.
template <typename Fn>
void dispatch_cuda_float_types(at::ScalarType dtype, Fn fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}, float{}); break;
    case at::kHalf: fn(__half{}, at::Half{}); break;
    default: fn(__nv_bfloat16{}, at::BFloat16{}); break;
  }
}

}  // namespace genfast
