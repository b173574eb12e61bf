// Squared L2 norms, per sample, of the Philox noise a call keyed by (seed, offset) draws, without
// writing the noise anywhere: the Langevin corrector needs ||z|| before its update, which then
// draws the same z again.
//
// Sample r covers elements [r * row_size, (r + 1) * row_size); its elements are cut into chunks of
// chunk_size, and partial[r * num_chunks + c] receives the sum of z^2 over chunk c. Summing the
// partials of a row (in a fixed order) gives a deterministic result.
#pragma once

#include <stdint.h>

#include "host_device.h"
#include "philox.h"

namespace genfast {

struct NoiseNormsParams {
  int64_t rows;
  int64_t row_size;
  int64_t chunk_size;
  int64_t num_chunks;  // per row: ceil(row_size / chunk_size)
  float* partial;      // rows * num_chunks
  PhiloxKeyRef philox;
};

// The sum of z^2 over elements [begin, end) of the stream keyed by (seed, offset).
GF_HOST_DEVICE float philox_sum_squares(uint64_t seed, uint64_t offset, int64_t begin, int64_t end) {
  float sum = 0.0f;
  for (int64_t group = begin / 4; group * 4 < end; ++group) {
    const Float4x32 n = philox_normal4(seed, offset, static_cast<uint64_t>(group));
    const float z[4] = {n.x, n.y, n.z, n.w};
    for (int j = 0; j < 4; ++j) {
      const int64_t i = group * 4 + j;
      if (i >= begin && i < end) sum += z[j] * z[j];
    }
  }
  return sum;
}

}  // namespace genfast
