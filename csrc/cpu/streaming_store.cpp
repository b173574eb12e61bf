#include "streaming_store.h"

#include <string.h>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GF_X86_STREAMING 1
#endif

namespace genfast {
namespace {

#ifdef GF_X86_STREAMING
template <int kAlign>
int64_t unaligned_head(const float* dst, int64_t n) {
  const int64_t misalignment = reinterpret_cast<uintptr_t>(dst) % kAlign;
  const int64_t head = misalignment == 0 ? 0 : (kAlign - misalignment) / static_cast<int64_t>(sizeof(float));
  return head < n ? head : n;
}

__attribute__((target("avx512f"))) void store_avx512(float* dst, const float* src, int64_t n) {
  const int64_t head = unaligned_head<64>(dst, n);
  memcpy(dst, src, head * sizeof(float));
  int64_t j = head;
  for (; j + 16 <= n; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
  memcpy(dst + j, src + j, (n - j) * sizeof(float));
}

__attribute__((target("avx2"))) void store_avx2(float* dst, const float* src, int64_t n) {
  const int64_t head = unaligned_head<32>(dst, n);
  memcpy(dst, src, head * sizeof(float));
  int64_t j = head;
  for (; j + 8 <= n; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
  memcpy(dst + j, src + j, (n - j) * sizeof(float));
}

using StoreFn = void (*)(float*, const float*, int64_t);

StoreFn pick_store() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return store_avx512;
  if (__builtin_cpu_supports("avx2")) return store_avx2;
  return nullptr;
}
#endif

}  // namespace

void streaming_store(float* dst, const float* src, int64_t n) {
#ifdef GF_X86_STREAMING
  static const StoreFn store = pick_store();
  if (store != nullptr) {
    store(dst, src, n);
    return;
  }
#endif
  memcpy(dst, src, n * sizeof(float));
}

void streaming_store_fence() {
#ifdef GF_X86_STREAMING
  _mm_sfence();
#endif
}

bool pages_resident(const void* data, int64_t bytes) {
#ifdef __linux__
  if (bytes <= 0) return true;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto resident = [](uintptr_t address) {
    unsigned char in_memory = 0;
    return mincore(reinterpret_cast<void*>(address & ~(page - 1)), 1, &in_memory) == 0 && (in_memory & 1) != 0;
  };
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  return resident(begin + static_cast<uintptr_t>(bytes / 2)) && resident(begin + static_cast<uintptr_t>(bytes - 1));
#else
  (void)data;
  (void)bytes;
  return true;
#endif
}

}  // namespace genfast
