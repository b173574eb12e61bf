// genfast::mala_accept on CUDA: per-sample sums (pass 1), the decision (device tensors, no sync),
// then the copies of the kept rows (pass 2), all on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "launch.h"

#include "../../kernels/cuda/mala.cuh"
#include "../mala_args.h"

namespace genfast {
namespace {

template <typename T, typename Storage>
void run(const at::Tensor& x, const at::Tensor& y, const at::Tensor& grad_x, const at::Tensor& grad_y,
         const at::Tensor& energy_x, const at::Tensor& energy_y, const at::Tensor& step_size, const at::Tensor& uniform,
         const at::Tensor& x_out, const at::Tensor& grad_out, const at::Tensor& energy_out,
         const at::Tensor& accepted) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  run_mala_accept<T, Storage>(
      x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform, x_out, grad_out, energy_out, accepted,
      [&](const MalaSumsParams<T>& p) {
        check_grid_y(kMalaAcceptOp, "a sample's element count", p.row_size, p.chunk_size);
        check_launch(kMalaAcceptOp, launch_mala_sums(p, stream));
      },
      [&](const MalaSelectParams<T>& p) { check_launch(kMalaAcceptOp, launch_mala_select(p, stream)); });
}

void mala_accept_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& grad_x, const at::Tensor& grad_y,
                      const at::Tensor& energy_x, const at::Tensor& energy_y, const at::Tensor& step_size,
                      const at::Tensor& uniform, const at::Tensor& x_out, const at::Tensor& grad_out,
                      const at::Tensor& energy_out, const at::Tensor& accepted) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_mala_accept(x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform, x_out, grad_out, energy_out,
                    accepted);
  if (x.size(0) == 0) return;
  switch (x.scalar_type()) {
    case at::kFloat:
      run<float, float>(x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform, x_out, grad_out, energy_out,
                        accepted);
      break;
    case at::kHalf:
      run<__half, at::Half>(x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform, x_out, grad_out,
                            energy_out, accepted);
      break;
    default:
      run<__nv_bfloat16, at::BFloat16>(x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform, x_out,
                                       grad_out, energy_out, accepted);
      break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) { m.impl("mala_accept", &mala_accept_cuda); }

}  // namespace genfast
