#include "philox_block.h"

#include <algorithm>

#include "../../kernels/common/normal_math.h"
#include "cpu_features.h"

namespace genfast {
namespace {

// philox4x32_10 of groups first_group .. first_group + kPhiloxLanes - 1: word w of group first_group + l
// in words[w][l].
GF_CPU_INLINE void philox_lanes(uint64_t seed, uint64_t offset, uint64_t first_group,
                                uint32_t (&words)[4][kPhiloxLanes]) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  const uint64_t base = offset / 4;
  uint32_t(&c0)[kPhiloxLanes] = words[0];
  uint32_t(&c1)[kPhiloxLanes] = words[1];
  uint32_t(&c2)[kPhiloxLanes] = words[2];
  uint32_t(&c3)[kPhiloxLanes] = words[3];
  for (int l = 0; l < kPhiloxLanes; ++l) {
    const uint64_t group = first_group + l;
    c0[l] = static_cast<uint32_t>(base);
    c1[l] = static_cast<uint32_t>(base >> 32);
    c2[l] = static_cast<uint32_t>(group);
    c3[l] = static_cast<uint32_t>(group >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    // Left a loop for the vectorizer: unrolled first, g++ leaves the 32-bit products scalar.
#pragma GCC unroll 1
    for (int l = 0; l < kPhiloxLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c0[l] = n0;
      c1[l] = static_cast<uint32_t>(p1);
      c2[l] = n2;
      c3[l] = static_cast<uint32_t>(p0);
    }
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
}

template <CpuCapability isa>
GF_CPU_INLINE void philox_normals_lanes_for(uint64_t seed, uint64_t offset, uint64_t first_group, float* z) {
  uint32_t words[4][kPhiloxLanes];
  philox_lanes(seed, offset, first_group, words);
  float r0[kPhiloxLanes], r1[kPhiloxLanes], cos0[kPhiloxLanes], sin0[kPhiloxLanes], cos1[kPhiloxLanes],
      sin1[kPhiloxLanes];
  for (int l = 0; l < kPhiloxLanes; ++l) {
    r0[l] = box_muller_radius(words[0][l]);
    r1[l] = box_muller_radius(words[2][l]);
    cos_sin_turns(words[1][l], &cos0[l], &sin0[l]);
    cos_sin_turns(words[3][l], &cos1[l], &sin1[l]);
  }
  for (int l = 0; l < kPhiloxLanes; ++l) {
    z[4 * l + 0] = r0[l] * cos0[l];
    z[4 * l + 1] = r0[l] * sin0[l];
    z[4 * l + 2] = r1[l] * cos1[l];
    z[4 * l + 3] = r1[l] * sin1[l];
  }
}
GF_CPU_DISPATCH(philox_normals_lanes)

// Dropout's factors of the 4 kPhiloxLanes elements of groups first_group .. first_group + kPhiloxLanes - 1.
template <CpuCapability isa>
GF_CPU_INLINE void philox_dropout_lanes_for(uint64_t seed, uint64_t offset, uint64_t first_group, float p,
                                            float keep_scale, float* scales) {
  uint32_t words[4][kPhiloxLanes];
  philox_lanes(seed, offset, first_group, words);
  for (int l = 0; l < kPhiloxLanes; ++l) {
    for (int w = 0; w < 4; ++w) scales[4 * l + w] = uniform_open_zero(words[w][l]) >= p ? keep_scale : 0.0f;
  }
}
GF_CPU_DISPATCH(philox_dropout_lanes)

}  // namespace

void philox_normals(uint64_t seed, uint64_t offset, uint64_t first_group, int64_t num_groups, float* z) {
  for (int64_t g = 0; g < num_groups; g += kPhiloxLanes) {
    philox_normals_lanes(seed, offset, first_group + g, z + 4 * g);
  }
}

void philox_dropout_scales(uint64_t seed, uint64_t offset, uint64_t first, int64_t count, float p, float keep_scale,
                           float* scales) {
  constexpr int64_t kBatch = 4 * kPhiloxLanes;  // elements per batch of groups
  float batch[kBatch];
  const uint64_t first_group = first / 4;
  const int64_t skip = static_cast<int64_t>(first % 4);  // elements of the first group before `first`
  for (int64_t at = -skip; at < count; at += kBatch) {
    philox_dropout_lanes(seed, offset, first_group + static_cast<uint64_t>((at + skip) / 4), p, keep_scale, batch);
    const int64_t from = std::max<int64_t>(at, 0), to = std::min(at + kBatch, count);
    std::copy(batch + (from - at), batch + (to - at), scales + from);
  }
}

}  // namespace genfast
