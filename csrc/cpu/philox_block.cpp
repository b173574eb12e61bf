#include "philox_block.h"

#include "../../kernels/common/normal_math.h"
#include "cpu_features.h"

namespace genfast {
namespace {

template <CpuCapability isa>
GF_CPU_INLINE void philox_normals_lanes_for(uint64_t seed, uint64_t offset, uint64_t first_group, float* z) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  const uint64_t base = offset / 4;
  uint32_t c0[kPhiloxLanes], c1[kPhiloxLanes], c2[kPhiloxLanes], c3[kPhiloxLanes];
  for (int l = 0; l < kPhiloxLanes; ++l) {
    const uint64_t group = first_group + l;
    c0[l] = static_cast<uint32_t>(base);
    c1[l] = static_cast<uint32_t>(base >> 32);
    c2[l] = static_cast<uint32_t>(group);
    c3[l] = static_cast<uint32_t>(group >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
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
  float r0[kPhiloxLanes], r1[kPhiloxLanes], cos0[kPhiloxLanes], sin0[kPhiloxLanes], cos1[kPhiloxLanes],
      sin1[kPhiloxLanes];
  for (int l = 0; l < kPhiloxLanes; ++l) {
    r0[l] = box_muller_radius(c0[l]);
    r1[l] = box_muller_radius(c2[l]);
    cos_sin_turns(c1[l], &cos0[l], &sin0[l]);
    cos_sin_turns(c3[l], &cos1[l], &sin1[l]);
  }
  for (int l = 0; l < kPhiloxLanes; ++l) {
    z[4 * l + 0] = r0[l] * cos0[l];
    z[4 * l + 1] = r0[l] * sin0[l];
    z[4 * l + 2] = r1[l] * cos1[l];
    z[4 * l + 3] = r1[l] * sin1[l];
  }
}
GF_CPU_DISPATCH(philox_normals_lanes)

}  // namespace

void philox_normals(uint64_t seed, uint64_t offset, uint64_t first_group, int64_t num_groups, float* z) {
  for (int64_t g = 0; g < num_groups; g += kPhiloxLanes) {
    philox_normals_lanes(seed, offset, first_group + g, z + 4 * g);
  }
}

}  // namespace genfast
