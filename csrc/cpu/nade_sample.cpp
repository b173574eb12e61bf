// genfast::nade_sample on the CPU: the forward's tiles of samples, each step drawing x[d] from its
// conditional and feeding it to the running pre-activations.
#include <torch/library.h>

#include "../nade_args.h"
#include "nade_steps.h"

namespace genfast {
namespace {

template <NadeActivation kAct, typename T>
void nade_sample_typed(const NadeSampleParams<T>& p) {
  uint64_t seed = 0, offset = 0;
  resolve_philox_key(p.key, &seed, &offset);
  const int64_t H = p.hidden;
  for_each_nade_step<kAct>(p.rows, p.dims, H, p.c, [&](int64_t row, int64_t k, float* a, float* h, float* products) {
    const int64_t d = nade_step_dim(p.ordering, p.ordering_per_row, row, p.dims, k);
    const int64_t element = row * p.dims + d;
    float value;
    if (k < p.num_observed) {
      value = p.observed[element];
    } else {
      const float logit = p.b[d] + dot(p.v + d * H, h, products, H);
      const float u = p.uniforms != nullptr ? p.uniforms[element]
                                            : philox_uniform(seed, offset, static_cast<uint64_t>(element));
      value = nade_draw(logit, u);
    }
    p.x[element] = static_cast<T>(value);
    if (value != 0.0f) add_scaled_and_activate<kAct>(a, h, p.w_t + d * H, value, H);
  });
}

at::Tensor nade_sample_cpu(const at::Tensor& W, const at::Tensor& c, const at::Tensor& V, const at::Tensor& b,
                           int64_t num_samples, at::ScalarType dtype, const std::optional<at::Tensor>& uniforms,
                           const std::optional<at::Tensor>& ordering, const std::optional<at::Tensor>& observed,
                           int64_t num_observed, c10::string_view activation,
                           const std::optional<at::Generator>& generator, int64_t seed, int64_t offset) {
  TORCH_CHECK(!generator.has_value(), kNadeSampleOp,
              ": generator is for CUDA; on the CPU pass the key as seed and offset");
  const NadeTensors t = prepare_nade_sample(W, c, V, b, num_samples, dtype, uniforms, ordering, observed, num_observed,
                                            std::string_view(activation.data(), activation.size()));
  at::Tensor samples = at::empty({num_samples, W.size(1)}, W.options().dtype(dtype));
  if (samples.numel() == 0) return samples;
  const PhiloxKeyRef key{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), nullptr, nullptr};
  const auto run = [&](auto type) {
    using T = decltype(type);
    const NadeSampleParams<T> p = nade_sample_params<T, T>(t, key, samples);
    if (p.activation == NadeActivation::kRelu) {
      nade_sample_typed<NadeActivation::kRelu>(p);
    } else {
      nade_sample_typed<NadeActivation::kSigmoid>(p);
    }
  };
  switch (dtype) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: run(at::BFloat16{}); break;
  }
  return samples;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("nade_sample", &nade_sample_cpu); }

}  // namespace genfast
