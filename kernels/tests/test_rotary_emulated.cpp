// The CUDA rotary kernel (kernels/cuda/rotary.cu), run on the host by cuda_emulator.h through its
// launcher, against a float64 evaluation of the turn written out in rotary_float64.h: interleaved and
// GPT-NeoX planes, full and partial rotary dims, the inverse turn, strided input and output, positions
// broadcast over the batch (stride 0) and outside the tables, and in place; float32, float16 and
// bfloat16. The output starts
// as NaN, so a missed write fails, and x must be unchanged unless turned in place. Built and run by
// CMake (ctest).
#include "cuda_emulator.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../cuda/rotary.cu"
#include "emulated_elements.h"
#include "rotary_float64.h"

namespace {

int failures = 0;

struct Case {
  const char* name;
  int rotary_dim;
  bool interleaved, inverse, in_place, broadcast_positions;
};

template <typename T>
void run_case(const Case& c) {
  const int batch = 2, seqlen = 5, heads = 3, dim = 16, half = c.rotary_dim / 2, positions = 11;
  // x (batch, heads, seqlen, dim) read as (batch, seqlen, heads, dim): strided heads and tokens
  const int64_t x_strides[3] = {heads * seqlen * dim, dim, seqlen * dim};
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<T> x(batch * seqlen * heads * dim);
  for (auto& e : x) e = from<T>(normal(rng));
  const std::vector<T> x_in = x;
  std::vector<T> out(x.size(), from<T>(NAN));
  const int table_stride = 8;  // rows of 8 of which the first half are read
  const RotaryTables<T> tables(positions, table_stride, 0.1);
  // 11 and -1 have no row of the tables: turned by nothing (cos 1, sin 0), not read past them
  const int32_t position_rows[batch * seqlen] = {3, 0, 10, 7, 11, 1, 2, -1, 4, 5};

  genfast::RotaryParams<T> p{};
  p.batch = batch;
  p.seqlen = seqlen;
  p.heads = heads;
  p.head_dim = dim;
  p.x = x.data();
  p.out = c.in_place ? x.data() : out.data();
  for (int d = 0; d < 3; ++d) {
    p.x_strides[d] = x_strides[d];
    p.out_strides[d] = c.in_place ? x_strides[d] : (d == 0 ? seqlen * heads * dim : (d == 1 ? heads * dim : dim));
  }
  p.cos = tables.cos.data();
  p.sin = tables.sin.data();
  p.table_rows = positions;
  p.table_stride = table_stride;
  p.half = half;
  p.positions = position_rows;
  p.position_strides[0] = c.broadcast_positions ? 0 : seqlen;
  p.position_strides[1] = 1;
  p.interleaved = c.interleaved;
  p.inverse = c.inverse;
  p.copy_rest = !c.in_place;
  if (genfast::launch_rotary(p, nullptr) != cudaSuccess) {
    std::printf("FAIL %s: launch\n", c.name);
    ++failures;
    return;
  }

  double worst = 0.0;
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < seqlen; ++i) {
      const int position = position_rows[(c.broadcast_positions ? 0 : b) * seqlen + i];
      for (int h = 0; h < heads; ++h) {
        const int64_t in_at = b * x_strides[0] + i * x_strides[1] + h * x_strides[2];
        const int64_t out_at = b * p.out_strides[0] + i * p.out_strides[1] + h * p.out_strides[2];
        std::vector<double> row(dim);
        for (int j = 0; j < dim; ++j) row[j] = as_float(x_in[in_at + j]);
        const bool in_table = position >= 0 && position < positions;
        const std::vector<double> ones(table_stride, 1.0), zeros(table_stride, 0.0);
        for (int j = 0; j < dim; ++j) {
          const double expected =
              turned(row, j, in_table ? tables.cos64.data() + position * table_stride : ones.data(),
                     in_table ? tables.sin64.data() + position * table_stride : zeros.data(), half, c.interleaved,
                     c.inverse);
          const double got = as_float(c.in_place ? x[out_at + j] : out[out_at + j]);
          if (!close_enough<T>(got, expected, &worst)) {
            if (failures < 20) std::printf("FAIL %s: (%d, %d, %d, %d) %g, expected %g\n", c.name, b, i, h, j, got,
                                           expected);
            ++failures;
          }
        }
      }
    }
  }
  for (size_t e = 0; !c.in_place && e < x.size(); ++e) {
    if (as_float(x[e]) != as_float(x_in[e])) {
      std::printf("FAIL %s: x written at %zu\n", c.name, e);
      ++failures;
      break;
    }
  }
  std::printf("%-48s %-9s max rel err %.2e\n", c.name, element_name<T>(), worst);
}

}  // namespace

int main() {
  const Case cases[] = {
      {"GPT-NeoX", 16, false, false, false, false},
      {"interleaved", 16, true, false, false, false},
      {"GPT-NeoX, rotary dim 10, inverse", 10, false, true, false, false},
      {"interleaved, rotary dim 6, positions broadcast", 6, true, false, false, true},
      {"GPT-NeoX, rotary dim 12, in place", 12, false, false, true, false},
      {"interleaved, in place, inverse", 16, true, true, true, true},
  };
  for (const Case& c : cases) {
    run_case<float>(c);
    run_case<__half>(c);
    run_case<__nv_bfloat16>(c);
  }
  std::printf("%d failed\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
