// A bool mask's block staged in shared memory beside the tiles of K and V (or of Q and dO), for the
// mma.sync kernels' general paths: each score then reads its mask byte from shared memory instead
// of global memory at a 64-bit address of its own, and the test whether the mask hides the block
// whole reads the copies each thread made itself, so it costs no loads of its own.
#pragma once

#include "attention_tile.cuh"

namespace genfast {
namespace attention_cuda {

// Two buffers of kRows x kCols bytes (a tile's rows, a block's keys), rows kStride bytes apart;
// bytes outside the sequence's queries and keys are 0 (hidden).
template <int kRows, int kCols, int kBlockThreads = kThreads>
struct BoolMaskTiles {
  // 16-byte aligned rows for cp.async; 80 bytes (20 banks) put the 8 rows a warp's 16-bit reads
  // touch at once in distinct banks, where 64 put 4 in one.
  static constexpr int kStride = kCols + 16;
  static constexpr int kTileBytes = kRows * kStride;
  static constexpr int kBytes = 2 * kTileBytes;  // of shared memory
  static constexpr int kChunks = kCols / 16;     // 16-byte chunks a row
  static constexpr int kAllChunks = kRows * kChunks;
  static constexpr int kCopies = (kAllChunks + kBlockThreads - 1) / kBlockThreads;  // at most, a thread
  static_assert(kCols % 16 == 0, "whole chunks");

  // The mask's pointer and strides are read from the kernel's parameters where used (held here, they
  // took 4 registers across the loops).
  const AttentionParams& p;
  uint8_t* smem;
  bool vector;  // 16-byte copies: keys contiguous, rows 16-byte aligned

  __device__ __forceinline__ BoolMaskTiles(const AttentionParams& params, uint8_t* shared, unsigned vector_flags)
      : p(params), smem(shared), vector((vector_flags & kVectorMask) != 0) {}

  __device__ __forceinline__ uint8_t* tile(int buf) const { return smem + buf * kTileBytes; }

  // Issues this thread's copies of keys j0 .. j0 + kCols - 1 of the tile's rows into buffer `buf`
  // (the caller commits them with K and V's): row(r, h, i) gives row r's head and query, false for a
  // row with none. Chunks inside the keys go by cp.async; others, and every chunk without `vector`,
  // by byte loads.
  template <typename RowFn>
  __device__ __forceinline__ void load(int64_t b, int j0, int k_len, const RowFn& row, int buf) const {
#pragma unroll
    for (int n = 0; n < kCopies; ++n) {
      const int e = static_cast<int>(threadIdx.x) + n * kBlockThreads, r = e / kChunks, c = (e % kChunks) * 16;
      if (kAllChunks % kBlockThreads != 0 && e >= kAllChunks) break;
      uint8_t* dst = tile(buf) + r * kStride + c;
      int64_t h;
      int i;
      if (!row(r, h, i)) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
        continue;
      }
      const int64_t key_stride = p.mask_stride[3];
      const uint8_t* src = static_cast<const uint8_t*>(p.mask) + attention_mask_row(p, b, h, i) + (j0 + c) * key_stride;
      if (vector && j0 + c + 16 <= k_len) {
        cp_async_16(dst, src);
        continue;
      }
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        if (j0 + c + k < k_len) w[k / 4] |= static_cast<uint32_t>(src[k * key_stride] != 0) << (8 * (k % 4));
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }

  // Whether any byte this thread copied into buffer `buf` shows its key, once its copies have landed
  // (cp_async_wait): its own writes, seen without a barrier.
  __device__ __forceinline__ bool shown(int buf) const {
    uint32_t any = 0u;
#pragma unroll
    for (int n = 0; n < kCopies; ++n) {
      const int e = static_cast<int>(threadIdx.x) + n * kBlockThreads;
      if (kAllChunks % kBlockThreads != 0 && e >= kAllChunks) break;
      const uint4 v = *reinterpret_cast<const uint4*>(tile(buf) + (e / kChunks) * kStride + (e % kChunks) * 16);
      any |= v.x | v.y | v.z | v.w;
    }
    return any != 0u;
  }
};

}  // namespace attention_cuda
}  // namespace genfast
