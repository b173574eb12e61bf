// Version counters of attention_merge_out's outputs: its ADInplaceOrView kernel moves each written
// tensor's version after the op, so that autograd refuses a tensor it saved for a backward that the
// op then overwrote (an op defined in C++ gets no such kernel by itself; the other native ops that
// write into their arguments have none yet). Inference tensors have no version, as in
// torch.autograd.graph.increment_version.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <initializer_list>

namespace genfast {
namespace {

void attention_merge_out_versions(c10::DispatchKeySet keys, at::TensorList o, at::TensorList lse, double ln_base,
                                  const at::Tensor& out, const at::Tensor& out_lse) {
  using Op = void(at::TensorList, at::TensorList, double, const at::Tensor&, const at::Tensor&);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("genfast::attention_merge_out", "").typed<Op>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, o, lse, ln_base, out, out_lse);
  }
  for (const at::Tensor* written : {&out, &out_lse}) {
    if (!written->is_inference()) torch::autograd::impl::bump_version(*written);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, ADInplaceOrView, m) {
  m.impl("attention_merge_out", TORCH_FN(attention_merge_out_versions));
}

}  // namespace genfast
