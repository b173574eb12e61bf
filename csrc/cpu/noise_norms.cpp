#include "noise_norms.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "block_loop.h"

namespace genfast {

// Chunks in parallel; inside a chunk, batches of Philox normals drawn lane-parallel.
void noise_norms_cpu(const NoiseNormsParams& p) {
  const int64_t tasks = p.rows * p.num_chunks;
  at::parallel_for(0, tasks, /*grain_size=*/1, [&](int64_t first, int64_t last) {
    alignas(64) float z[kBlock];
    for (int64_t task = first; task < last; ++task) {
      const int64_t row = task / p.num_chunks, chunk = task % p.num_chunks;
      const int64_t row_begin = row * p.row_size;
      const int64_t begin = row_begin + chunk * p.chunk_size;
      const int64_t end = std::min(begin + p.chunk_size, row_begin + p.row_size);
      double sum = 0.0;
      for (int64_t block = (begin / 4) * 4; block < end; block += kBlock) {
        const int64_t n = std::min(kBlock, end - block);
        philox_normals(p.philox.seed, p.philox.offset, static_cast<uint64_t>(block / 4), (n + 3) / 4, z);
        float block_sum = 0.0f;
        const int64_t skip = std::max<int64_t>(begin - block, 0);
        for (int64_t j = skip; j < n; ++j) block_sum += z[j] * z[j];
        sum += block_sum;
      }
      p.partial[task] = static_cast<float>(sum);
    }
  });
}

}  // namespace genfast
