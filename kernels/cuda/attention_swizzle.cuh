// Shared tiles as wgmma reads them (attention_forward_sm90.cu): [kD / 64][rows][64] 16-bit values,
// each row of a 64-column half 128 bytes, with the 128-byte swizzle: 16-byte chunk c of row r sits
// at chunk c ^ (r % 8), the tile 1024-byte aligned. A descriptor names such a tile as a K-major
// operand (rows are M or N, 64 K values per row) or, transposed, as an MN-major one (rows are K, 64
// M or N values per row); either way 8 rows make one 1024-byte swizzle atom, and that is the stride
// between consecutive atoms. The same value fills both offset fields: no instruction here reaches a
// second 64-wide half, so the field that would step to it is unused.
#pragma once

#include <stdint.h>

namespace genfast {
namespace attention_cuda {

constexpr uint32_t kSwizzleAtomBytes = 1024;

// The offset (in 16-bit values) of element (r, c) of a swizzled tile of kRows rows.
template <int kRows>
struct SwizzledRows {
  __device__ __forceinline__ int operator()(int r, int c) const {
    return (c / 64) * kRows * 64 + r * 64 + ((((c % 64) / 8) ^ (r % 8)) * 8) + c % 8;
  }
};

// The wgmma descriptor of a 128-byte-swizzled operand at shared address `address`: start address,
// leading and stride byte offsets (all in 16-byte units), base offset 0, layout type 1 (128B swizzle).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t address) {
  constexpr uint64_t kAtom = kSwizzleAtomBytes >> 4;
  return static_cast<uint64_t>((address >> 4) & 0x3fff) | (kAtom << 16) | (kAtom << 32) | (uint64_t{1} << 62);
}

}  // namespace attention_cuda
}  // namespace genfast
