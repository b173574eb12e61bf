// Float buffers that start on a cache line (64 bytes, one AVX-512 vector), so that the kernels'
// 16-float loads and stores never straddle two lines, whatever malloc returns.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <vector>

namespace genfast {

constexpr std::size_t kCacheLine = 64;

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kCacheLine)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

// Zeroed on construction, like std::vector.
using AlignedFloats = std::vector<float, CacheLineAllocator<float>>;

struct CacheLineDelete {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t(kCacheLine)); }
};

// Not zeroed: for large buffers that are written before they are read.
using UninitializedFloats = std::unique_ptr<float[], CacheLineDelete>;

inline UninitializedFloats uninitialized_floats(std::size_t n) {
  return UninitializedFloats(new (std::align_val_t(kCacheLine)) float[n]);
}

}  // namespace genfast
