// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3") and the
// Box-Muller transform that turns one Philox output into four standard normals.
//
// The counter layout follows torch's CUDA generator (curand_init(seed, subsequence, offset)):
// counter words 0-1 hold offset / 4 and words 2-3 hold the subsequence, which genfast sets to
// the index of a group of four consecutive elements. Element i therefore takes output i % 4 of
// group i / 4, on every backend.
#pragma once

#include <stdint.h>

#include "host_device.h"
#include "normal_math.h"

namespace genfast {

struct PhiloxKey {
  uint32_t k0, k1;
};

struct Uint4x32 {
  uint32_t x, y, z, w;
};

struct Float4x32 {
  float x, y, z, w;
};

GF_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

GF_HOST_DEVICE Uint4x32 philox4x32_10(Uint4x32 counter, PhiloxKey key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kMul0, counter.x, &hi0);
    const uint32_t lo1 = mulhilo32(kMul1, counter.z, &hi1);
    counter = Uint4x32{hi1 ^ counter.y ^ key.k0, lo1, hi0 ^ counter.w ^ key.k1, lo0};
    key.k0 += kWeyl0;
    key.k1 += kWeyl1;
  }
  return counter;
}

// The Philox output for group `group` of a call keyed by (seed, offset).
GF_HOST_DEVICE Uint4x32 philox_group_bits(uint64_t seed, uint64_t offset, uint64_t group) {
  const uint64_t base = offset / 4;
  const Uint4x32 counter{static_cast<uint32_t>(base), static_cast<uint32_t>(base >> 32),
                         static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32)};
  return philox4x32_10(counter, PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
}

// Four standard normals from four 32-bit words: (x, y) give the first pair, (z, w) the second.
GF_HOST_DEVICE Float4x32 box_muller4(Uint4x32 bits) {
  float c0, s0, c1, s1;
  const float r0 = box_muller_radius(bits.x);
  const float r1 = box_muller_radius(bits.z);
  cos_sin_turns(bits.y, &c0, &s0);
  cos_sin_turns(bits.w, &c1, &s1);
  return Float4x32{r0 * c0, r0 * s0, r1 * c1, r1 * s1};
}

// Where an op's noise comes from: none, a tensor the caller passes, or Philox inside the kernel.
enum class NoiseSource : int { kNone = 0, kTensor = 1, kPhilox = 2 };

// The key of one call. Under CUDA graph capture the seed and the base offset live in device
// memory that the graph refreshes before each replay (torch's graph-safe RNG); the kernel reads
// them, adding `offset`. Elsewhere both pointers are null.
struct PhiloxKeyRef {
  uint64_t seed;
  uint64_t offset;
  const int64_t* seed_ptr;
  const int64_t* offset_ptr;
};

GF_HOST_DEVICE void resolve_philox_key(const PhiloxKeyRef& key, uint64_t* seed, uint64_t* offset) {
  *seed = key.seed_ptr != nullptr ? static_cast<uint64_t>(*key.seed_ptr) : key.seed;
  *offset = key.offset_ptr != nullptr ? static_cast<uint64_t>(*key.offset_ptr) + key.offset : key.offset;
}

// Element `index` of the uniform stream keyed by (seed, offset): word index % 4 of group index / 4
// (genfast.reference.random.philox_uniform).
GF_HOST_DEVICE_INLINE float philox_uniform(uint64_t seed, uint64_t offset, uint64_t index) {
  const Uint4x32 words = philox_group_bits(seed, offset, index / 4);
  const uint32_t lane = static_cast<uint32_t>(index % 4);
  const uint32_t word = lane == 0 ? words.x : lane == 1 ? words.y : lane == 2 ? words.z : words.w;
  return uniform_open_zero(word);
}

GF_HOST_DEVICE Float4x32 philox_normal4(uint64_t seed, uint64_t offset, uint64_t group) {
  return box_muller4(philox_group_bits(seed, offset, group));
}

}  // namespace genfast
