// Checks and preparation shared by the bindings of genfast's elementwise ops (CPU and CUDA):
// every error names the op, the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace genfast {

inline void check_floating_input(const char* op, const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_like(const char* op, const at::Tensor& like, const char* like_name, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ", like.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name, " (",
              like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on the device of ", like_name, " (",
              like.device(), "), got ", t.device());
}

inline at::Tensor contiguous_if(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// Per-sample coefficients: a float32 (rows, num_coefs) tensor with one row or one per sample of
// `like`. row_size is the number of elements each row covers.
struct RowCoefficients {
  at::Tensor tensor;  // undefined when none were given
  int64_t row_size;
};

inline RowCoefficients row_coefficients(const char* op, const std::optional<at::Tensor>& row_coefs,
                                        const at::Tensor& like, int64_t num_coefs) {
  const int64_t numel = like.numel();
  if (!row_coefs) return {at::Tensor(), numel};
  const auto& rc = *row_coefs;
  TORCH_CHECK(rc.dim() == 2 && rc.size(1) == num_coefs, op, ": row_coefs must have shape (rows, ", num_coefs,
              "), got ", rc.sizes());
  TORCH_CHECK(rc.scalar_type() == at::kFloat, op, ": row_coefs must be float32, got ", rc.scalar_type());
  TORCH_CHECK(rc.device() == like.device(), op, ": row_coefs must be on the device of the input (", like.device(),
              "), got ", rc.device());
  const int64_t rows = rc.size(0);
  TORCH_CHECK(rows >= 1 && (numel == 0 || (numel % rows == 0 && like.dim() > 0 && like.size(0) % rows == 0)), op,
              ": row_coefs must have one row or one per sample (shape[0] = ", like.dim() > 0 ? like.size(0) : 0,
              "), got ", rows);
  return {rc.contiguous(), numel == 0 ? 1 : numel / rows};
}

// Kernels write contiguous memory: out itself when it is contiguous, else a buffer that
// copy_back_if_buffered copies into out afterwards.
inline at::Tensor contiguous_output(const at::Tensor& out) {
  return out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
}

inline at::Tensor contiguous_output_if(const std::optional<at::Tensor>& out) {
  return out.has_value() ? contiguous_output(*out) : at::Tensor();
}

inline void copy_back_if_buffered(const at::Tensor& written, const std::optional<at::Tensor>& out) {
  if (out.has_value() && written.defined() && !written.is_same(*out)) out->copy_(written);
}

// fn(T{}) for the tensor element type T of a float32, float16 or bfloat16 dtype (the CPU kernels'
// types; csrc/cuda/launch.h has the CUDA kernels' dispatch).
template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, Fn fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    default: fn(at::BFloat16{}); break;
  }
}

// Typed data pointers (T may be a CUDA type with the layout of Storage), null for an undefined tensor.
template <typename T, typename Storage>
const T* input_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr<Storage>()) : nullptr;
}

template <typename T, typename Storage>
T* output_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.mutable_data_ptr<Storage>()) : nullptr;
}

}  // namespace genfast
