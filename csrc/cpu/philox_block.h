// Philox streams for a run of consecutive element groups, on the CPU: the numbers of
// kernels/common/philox.h, computed lane-parallel so that the compiler vectorizes them.
#pragma once

#include <stdint.h>

namespace genfast {

constexpr int64_t kPhiloxLanes = 16;  // groups per vectorized batch

// Writes 4 * round_up(num_groups, kPhiloxLanes) normals to z: element j of the run is z[j]
// (philox_normal4).
void philox_normals(uint64_t seed, uint64_t offset, uint64_t first_group, int64_t num_groups, float* z);

// Dropout's factor for elements first .. first + count - 1 of the uniform stream (philox_uniform):
// keep_scale where the element's uniform is >= p (kept), else 0. Each group's Philox is computed once.
void philox_dropout_scales(uint64_t seed, uint64_t offset, uint64_t first, int64_t count, float p, float keep_scale,
                           float* scales);

}  // namespace genfast
