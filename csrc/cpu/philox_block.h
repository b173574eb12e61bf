// Standard normals from Philox for a run of consecutive element groups, on the CPU.
// Same numbers as kernels/common/philox.h (philox_normal4), computed lane-parallel so that the
// compiler vectorizes them.
#pragma once

#include <stdint.h>

namespace genfast {

constexpr int64_t kPhiloxLanes = 16;  // groups per vectorized batch

// Writes 4 * round_up(num_groups, kPhiloxLanes) normals to z: element j of the run is z[j].
void philox_normals(uint64_t seed, uint64_t offset, uint64_t first_group, int64_t num_groups, float* z);

}  // namespace genfast
