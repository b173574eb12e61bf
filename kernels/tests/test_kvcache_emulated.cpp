// The CUDA kvcache_append kernel (kernels/cuda/kvcache_append.cu), run on the host by
// cuda_emulator.h through its launcher, against a float64 evaluation of the rotary turn written
// out here: padded, cache_batch_idx and paged caches, interleaved and GPT-NeoX planes, a partial
// rotary dim, no rotation, queries turned in sequence or at the cache's end; float32, float16 and
// bfloat16. Caches start as NaN where nothing is written, so a missed or stray write fails too.
// Built and run by CMake (ctest).
#include "cuda_emulator.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../cuda/kvcache_append.cu"
#include "emulated_elements.h"
#include "rotary_float64.h"

namespace {

int failures = 0;

struct Case {
  const char* name;
  int layout;  // 0 padded, 1 cache_batch_idx, 2 paged
  int rotary_dim;
  bool interleaved, queries_in_sequence;
};

template <typename T>
void run_case(const Case& c) {
  const int batch = 3, new_rows = 3, kv_heads = 2, dim = 16, v_dim = 8, q_rows = 2, q_heads = 4;
  const int capacity = 12, page_size = 4, half = c.rotary_dim / 2, positions = capacity + 2;
  const int held[batch] = {4, 0, 9};
  const int32_t batch_idx[batch] = {2, 3, 0};
  const int32_t table[batch * capacity / page_size] = {7, 1, 4, 0, 8, 2, 6, 3, 5};
  const int rows = c.layout == 2 ? 9 : batch + 1, row_length = c.layout == 2 ? page_size : capacity;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  auto values = [&](size_t n) {
    std::vector<T> out(n);
    for (auto& e : out) e = from<T>(normal(rng));
    return out;
  };
  const std::vector<T> k = values(batch * new_rows * kv_heads * dim), v = values(batch * new_rows * kv_heads * v_dim);
  const std::vector<T> q = values(batch * q_rows * q_heads * dim);
  const RotaryTables<T> tables(positions, half, 0.0);
  std::vector<T> k_cache(rows * row_length * kv_heads * dim, from<T>(NAN));
  std::vector<T> v_cache(rows * row_length * kv_heads * v_dim, from<T>(NAN));
  std::vector<T> q_out(q.size(), from<T>(NAN));
  std::vector<int32_t> seqlens(held, held + batch);

  genfast::KvcacheAppendParams<T> p{};
  p.batch = batch;
  p.new_rows = new_rows;
  p.kv_heads = kv_heads;
  p.head_dim = dim;
  p.v_dim = v_dim;
  p.k = k.data();
  p.v = v.data();
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  const int64_t k_strides[3] = {row_length * kv_heads * dim, kv_heads * dim, dim};
  const int64_t v_strides[3] = {row_length * kv_heads * v_dim, kv_heads * v_dim, v_dim};
  for (int d = 0; d < 3; ++d) {
    p.k_cache_strides[d] = k_strides[d];
    p.v_cache_strides[d] = v_strides[d];
  }
  p.cache_seqlens = seqlens.data();
  p.cache_batch_idx = c.layout == 1 ? batch_idx : nullptr;
  p.block_table = c.layout == 2 ? table : nullptr;
  p.table_width = capacity / page_size;
  p.page_size = row_length;
  p.cos = half > 0 ? tables.cos.data() : nullptr;
  p.sin = half > 0 ? tables.sin.data() : nullptr;
  p.half = half;
  p.table_rows = positions;
  p.interleaved = c.interleaved;
  p.q = half > 0 ? q.data() : nullptr;
  p.q_out = half > 0 ? q_out.data() : nullptr;
  p.q_rows = q_rows;
  p.q_heads = q_heads;
  p.queries_in_sequence = c.queries_in_sequence;
  if (genfast::launch_kvcache_append(p, nullptr) != cudaSuccess) {
    std::printf("FAIL %s: launch\n", c.name);
    ++failures;
    return;
  }

  double worst = 0.0;
  std::vector<char> written(rows * row_length, 0);
  auto check = [&](double got, double expected, const char* what) {
    if (!close_enough<T>(got, expected, &worst)) {
      if (failures < 20) std::printf("FAIL %s: %s %g, expected %g\n", c.name, what, got, expected);
      ++failures;
    }
  };
  for (int n = 0; n < batch; ++n) {
    for (int i = 0; i < new_rows; ++i) {
      const int position = held[n] + i;
      const int row = c.layout == 2 ? table[n * (capacity / page_size) + position / page_size] * page_size +
                                          position % page_size
                                    : (c.layout == 1 ? batch_idx[n] : n) * capacity + position;
      written[row] = 1;
      for (int h = 0; h < kv_heads; ++h) {
        std::vector<double> x(dim);
        for (int j = 0; j < dim; ++j) x[j] = as_float(k[((n * new_rows + i) * kv_heads + h) * dim + j]);
        for (int j = 0; j < dim; ++j) {
          check(as_float(k_cache[(row * kv_heads + h) * dim + j]),
                turned(x, j, tables.cos64.data() + position * half, tables.sin64.data() + position * half, half,
                       c.interleaved),
                "key");
        }
        for (int j = 0; j < v_dim; ++j) {
          check(as_float(v_cache[(row * kv_heads + h) * v_dim + j]),
                as_float(v[((n * new_rows + i) * kv_heads + h) * v_dim + j]), "value");
        }
      }
    }
    for (int i = 0; half > 0 && i < q_rows; ++i) {
      const int position = held[n] + (c.queries_in_sequence ? i : 0);
      for (int h = 0; h < q_heads; ++h) {
        const int offset = ((n * q_rows + i) * q_heads + h) * dim;
        std::vector<double> x(dim);
        for (int j = 0; j < dim; ++j) x[j] = as_float(q[offset + j]);
        for (int j = 0; j < dim; ++j) {
          check(as_float(q_out[offset + j]),
                turned(x, j, tables.cos64.data() + position * half, tables.sin64.data() + position * half, half,
                       c.interleaved),
                "query");
        }
      }
    }
  }
  for (int row = 0; row < rows * row_length; ++row) {
    for (int e = 0; !written[row] && e < kv_heads * dim; ++e) {
      if (!std::isnan(as_float(k_cache[row * kv_heads * dim + e]))) {
        std::printf("FAIL %s: cache row %d written, but no key goes there\n", c.name, row);
        ++failures;
        break;
      }
    }
  }
  std::printf("%-40s %-13s max rel err %.2e\n", c.name, element_name<T>(), worst);
}

}  // namespace

int main() {
  const Case cases[] = {
      {"padded, GPT-NeoX, queries in sequence", 0, 16, false, true},
      {"cache_batch_idx, interleaved, queries at end", 1, 16, true, false},
      {"paged, GPT-NeoX, rotary dim 6", 2, 6, false, true},
      {"paged, interleaved, rotary dim 10", 2, 10, true, false},
      {"padded, no rotation", 0, 0, false, true},
  };
  for (const Case& c : cases) {
    run_case<float>(c);
    run_case<__half>(c);
    run_case<__nv_bfloat16>(c);
  }
  std::printf("%d failed\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
