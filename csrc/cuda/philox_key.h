// The Philox key of one call, from a CUDA generator, shared by the CUDA bindings.
#pragma once

#include <ATen/cuda/CUDAGeneratorImpl.h>

#include <mutex>
#include <optional>

#include "../../kernels/common/philox.h"

namespace genfast {

// Advances the generator's offset by 4, as torch's own kernels do. Under graph capture, torch hands
// out device pointers that the graph refreshes on every replay, so each replay draws fresh noise.
inline PhiloxKeyRef philox_key_from(const at::Generator& generator) {
  auto* gen = at::check_generator<at::CUDAGeneratorImpl>(generator);
  std::lock_guard<std::mutex> lock(gen->mutex_);
  const at::PhiloxCudaState state = gen->philox_cuda_state(4);
  if (state.captured_) {
    return PhiloxKeyRef{0, state.offset_intragraph_, state.seed_.ptr, state.offset_.ptr};
  }
  return PhiloxKeyRef{state.seed_.val, state.offset_.val, nullptr, nullptr};
}

// The key from `generator` when the kernel draws noise and one was given; else none (the
// kernel then uses the seed and offset arguments). The generator must be `device`'s: under capture
// another device's would hand the graph pointers it does not refresh.
inline std::optional<PhiloxKeyRef> cuda_philox_key(const char* op, bool draws_noise,
                                                   const std::optional<at::Generator>& generator,
                                                   const at::Device& device) {
  if (!draws_noise || !generator.has_value()) return std::nullopt;
  const at::Device own = generator->device();  // index -1: a generator made for "cuda" unnumbered
  TORCH_CHECK(own.type() == at::kCUDA && (own.index() < 0 || own.index() == device.index()), op,
              ": generator must be a CUDA generator of the tensors' device ", device, ", got one of ", own);
  return philox_key_from(*generator);
}

}  // namespace genfast
