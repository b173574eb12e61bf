// genfast::rotary and rotary_ on CUDA: one launch on the current stream, no synchronisation (the
// positions are read on the device, and not checked there).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../../kernels/cuda/rotary.cuh"
#include "../rotary_args.h"
#include "launch.h"

namespace genfast {
namespace {

at::Tensor rotary_cuda_run(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& positions, bool interleaved, bool inverse, bool in_place) {
  const c10::cuda::CUDAGuard guard(x.device());
  return run_rotary(x, cos, sin, positions, interleaved, inverse, in_place, [&](const at::Tensor& input,
                                                                               const at::Tensor& out) {
    std::vector<at::Tensor> keep;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_cuda_float_types(x.scalar_type(), [&](auto element, auto storage) {
      using T = decltype(element);
      using Storage = decltype(storage);
      check_launch(kRotaryOp, launch_rotary(rotary_params<T, Storage>(input, cos, sin, positions, interleaved,
                                                                      inverse, out, keep), stream));
    });
  });
}

at::Tensor rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                       bool interleaved, bool inverse) {
  return rotary_cuda_run(x, cos, sin, positions, interleaved, inverse, false);
}

void rotary_inplace_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& positions, bool interleaved, bool inverse) {
  rotary_cuda_run(x, cos, sin, positions, interleaved, inverse, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("rotary", &rotary_cuda);
  m.impl("rotary_", &rotary_inplace_cuda);
}

}  // namespace genfast
