// The loop every elementwise CPU kernel shares: blocks of kBlock elements, in parallel over
// blocks; inside a block, float32 buffers that the compiler vectorizes over, with the inputs
// converted in and the outputs converted (or streamed) out. Rows of per-sample coefficients are
// handled by for_each_row_segment.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/TensorBase.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "../../kernels/common/philox.h"
#include "float_io.h"
#include "philox_block.h"
#include "streaming_store.h"

namespace genfast {

constexpr int64_t kBlock = 1024;  // elements; a multiple of 4 * kPhiloxLanes
static_assert(kBlock % (4 * kPhiloxLanes) == 0, "a block must hold whole Philox batches");

// A block of zeros, read where an optional input is absent.
alignas(64) inline constexpr float kZeroBlock[kBlock] = {};

// One block [i0, i0 + n) of a tensor of element type T, seen as float32.
template <typename T>
class Block {
 public:
  static constexpr bool kIsFloat = std::is_same<T, float>::value;

  Block(int64_t i0, int64_t n, bool streaming) : i0_(i0), n_(n), streaming_(streaming) {}
  int64_t begin() const { return i0_; }
  int64_t size() const { return n_; }

  // The block of src as floats: src itself for float32, else converted into buffer; null stays null.
  const float* input(const T* src, float* buffer) const {
    if (src == nullptr) return nullptr;
    if constexpr (kIsFloat) {
      return src + i0_;
    } else {
      to_float(src + i0_, buffer, n_);
      return buffer;
    }
  }

  // Where to compute the block of dst: dst itself for float32 unless streaming, else buffer
  // (also when dst is null, so that the kernel can always write). commit() finishes the store.
  float* output(T* dst, float* buffer) const {
    if constexpr (kIsFloat) {
      if (dst != nullptr && !streaming_) return dst + i0_;
    }
    return buffer;
  }

  void commit(T* dst, const float* computed) const {
    if (dst == nullptr) return;
    if constexpr (kIsFloat) {
      if (streaming_) streaming_store(dst + i0_, computed, n_);
    } else {
      from_float(computed, dst + i0_, n_);
    }
  }

 private:
  int64_t i0_, n_;
  bool streaming_;
};

// Whether an elementwise op streams its outputs: float32 outputs of kStreamingStoreMinBytes and
// more whose pages are resident, none sharing memory with an input (an in-place step has just
// read the lines it writes, which plain stores then hit). Undefined tensors are skipped. On an
// Intel Xeon (2 threads), a 64 MiB DDIM step into a new output took 26 ms with streaming stores and
// 19 without (with huge pages 12.2 and 10.9), in place 6.1 and 4.7 ms (huge pages), but into a
// given output written before 5.3 ms against 7.2 (huge pages; about even without them).
inline bool stream_outputs(std::initializer_list<at::TensorBase> outputs,
                           std::initializer_list<at::TensorBase> inputs) {
  for (const at::TensorBase& out : outputs) {
    if (!out.defined()) continue;
    const int64_t bytes = out.numel() * static_cast<int64_t>(out.element_size());
    if (out.scalar_type() != at::kFloat || !worth_streaming(out.const_data_ptr(), bytes)) return false;
    for (const at::TensorBase& in : inputs) {
      if (in.defined() && at::get_overlap_status(out, in) != at::MemOverlapStatus::No) return false;
    }
  }
  return true;
}

// Runs fn(Block<T>&) over [0, numel) in parallel; float outputs are streamed where `stream`
// (stream_outputs).
template <typename T, typename Fn>
void for_each_block(int64_t numel, bool stream, Fn fn) {
  const int64_t num_blocks = (numel + kBlock - 1) / kBlock;
  const bool streaming = stream && std::is_same<T, float>::value;
  at::parallel_for(0, num_blocks, /*grain_size=*/16, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      Block<T> block(b * kBlock, std::min(kBlock, numel - b * kBlock), streaming);
      fn(block);
    }
    if (streaming) streaming_store_fence();
  });
}

// Calls fn(offset_in_block, count, coefs) for each run of the block that lies in one row of
// per-sample coefficients (all of it when row_coefs is null).
template <typename Fn>
void for_each_row_segment(int64_t i0, int64_t n, int64_t row_size, const float* row_coefs, const float* coefs,
                          int num_coefs, Fn fn) {
  for (int64_t s = 0; s < n;) {
    const int64_t row = (i0 + s) / row_size;
    const int64_t e = std::min(n, (row + 1) * row_size - i0);
    fn(s, e - s, row_coefs != nullptr ? row_coefs + row * num_coefs : coefs);
    s = e;
  }
}

// The block's noise: Philox normals, the noise tensor, or zeros.
template <typename T>
const float* block_noise(const Block<T>& block, NoiseSource source, const PhiloxKeyRef& key, const T* noise,
                         float* buffer) {
  if (source == NoiseSource::kPhilox) {
    philox_normals(key.seed, key.offset, static_cast<uint64_t>(block.begin() / 4), (block.size() + 3) / 4, buffer);
    return buffer;
  }
  if (source == NoiseSource::kTensor) return block.input(noise, buffer);
  return kZeroBlock;
}

}  // namespace genfast
