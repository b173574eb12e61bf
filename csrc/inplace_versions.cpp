// Version counters of the tensors the native ops write into (the arguments their schemas mark
// Tensor(a!), alone or in lists): one ADInplaceOrView kernel, read from the schema, moves each
// written tensor's version after the op, so that autograd refuses a tensor it saved for a backward
// that the op then overwrote, as it does after torch's own in-place ops (an op defined in C++ gets
// no such kernel by itself). Inference tensors have no version, as in
// torch.autograd.graph.increment_version. tests/test_inplace_versions.py checks that every genfast
// op with a written argument has it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

namespace genfast {
namespace {

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  std::vector<at::Tensor> written;
  const size_t first = stack->size() - arguments.size();
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor()) {
      written.push_back(value.toTensor());
    } else if (value.isList()) {  // Tensor(a!)[] and Tensor(a!)?[]
      for (const c10::IValue& item : value.toListRef()) {
        if (item.isTensor()) written.push_back(item.toTensor());
      }
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& tensor : written) {
    if (tensor.defined() && !tensor.is_inference()) torch::autograd::impl::bump_version(tensor);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, ADInplaceOrView, m) {
  for (const char* name : {"denoise_step", "langevin_step", "langevin_corrector_step", "mala_accept",
                           "kvcache_append", "rotary_", "attention_merge_out"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  }
}

}  // namespace genfast
