// Stores that bypass the cache, for outputs larger than the cache: a plain store first reads the
// destination line (read-for-ownership), so a streaming store saves one pass over memory.
#pragma once

#include <stdint.h>

namespace genfast {

// Writes n floats from src to dst with non-temporal stores where the CPU has them (x86-64 AVX2 or
// AVX-512), plain stores elsewhere. Call streaming_store_fence() before other threads read dst.
void streaming_store(float* dst, const float* src, int64_t n);
void streaming_store_fence();

// Outputs at least this large (bytes) are written with streaming stores; the elementwise ops and
// the attention merge also ask that their pages be resident (worth_streaming, below).
constexpr int64_t kStreamingStoreMinBytes = int64_t{32} << 20;

// Whether the pages under [data, data + bytes) are in memory already; tells a new output (a fresh
// mapping) from one written before. Streaming stores only pay into the latter: a page's first touch
// clears it, which leaves its lines in the cache, and streaming stores then evict the lines that
// plain stores would hit. Looks at the middle and last pages (an allocator may write a header in
// front of a fresh block) with Linux's mincore (false where it fails); true elsewhere (no mincore).
bool pages_resident(const void* data, int64_t bytes);

// Whether an output of `bytes` at `data` is worth streaming: at least kStreamingStoreMinBytes, its
// pages resident (asked only of outputs that large: mincore is a system call).
inline bool worth_streaming(const void* data, int64_t bytes) {
  return bytes >= kStreamingStoreMinBytes && pages_resident(data, bytes);
}

}  // namespace genfast
