// genfast::made_linear and its backward on the CPU: register-blocked products (8 rows x 16
// columns of accumulators, one rank-1 update per step of the reduction) over operands permuted so
// that the degree mask becomes a staircase. With inputs sorted by degree, the inputs an output
// sees are a prefix; with outputs sorted too, blocks of 16 outputs share one panel of the masked
// weights, packed once, and no product is computed across a block's masked-out tail. Every sum
// runs in a fixed order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "../made_linear_args.h"
#include "aligned_floats.h"
#include "block_product.h"

namespace genfast {
namespace {

// The layer's units in degree order, and for each the length of its staircase row.
struct Staircase {
  std::vector<int64_t> in_order, out_order;  // units sorted by degree (stable)
  std::vector<int64_t> seen;                 // per output (in out_order): how many sorted inputs it sees
  std::vector<int64_t> first_seeing;         // per input (in in_order): the first sorted output seeing it
};

Staircase staircase(const MadeLinearParams<float>& p) {
  Staircase s;
  const auto by_degree = [](const int32_t* degrees, int64_t n) {
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return degrees[i] < degrees[j]; });
    return order;
  };
  s.in_order = by_degree(p.in_degrees, p.in_features);
  s.out_order = by_degree(p.out_degrees, p.out_features);
  s.seen.resize(static_cast<size_t>(p.out_features));
  s.first_seeing.resize(static_cast<size_t>(p.in_features));
  int64_t j = 0;
  for (int64_t k = 0; k < p.out_features; ++k) {  // outputs ascending: the prefixes only grow
    const int32_t degree = p.out_degrees[s.out_order[k]];
    while (j < p.in_features && made_connected(degree, p.in_degrees[s.in_order[j]], p.strict)) ++j;
    s.seen[k] = j;
  }
  int64_t k = 0;
  for (int64_t i = 0; i < p.in_features; ++i) {
    const int32_t degree = p.in_degrees[s.in_order[i]];
    while (k < p.out_features && !made_connected(p.out_degrees[s.out_order[k]], degree, p.strict)) ++k;
    s.first_seeing[i] = k;
  }
  return s;
}

// src's columns in `order`, each row padded with zeros to `stride`.
AlignedFloats permuted_columns(const float* src, int64_t rows, int64_t cols, const std::vector<int64_t>& order,
                               int64_t stride) {
  AlignedFloats out(static_cast<size_t>(rows * stride), 0.0f);
  at::parallel_for(0, rows, 64, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      for (int64_t i = 0; i < static_cast<int64_t>(order.size()); ++i) out[r * stride + i] = src[r * cols + order[i]];
    }
  });
  return out;
}

int64_t padded(int64_t n) { return (n + kCols - 1) / kCols * kCols; }

constexpr int64_t kRowChunk = 256;  // rows of the left operand kept in cache across panels

// out = a (rows x red, row stride a_stride) times panels of kCols columns, in parallel over (chunk
// of kRowChunk rows, panel) pairs: pack(block, panel) fills a panel and returns the reduction range
// [begin, end) it covers; store(block, row0, count, acc) takes each kRows rows' results. Packing
// again for each chunk costs 1/kRowChunk of the products.
template <typename Pack, typename Store>
void panel_products(const float* a, int64_t rows, int64_t a_stride, int64_t blocks, int64_t panel_floats,
                    const Pack& pack, const Store& store) {
  const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t first, int64_t last) {
    AlignedFloats panel(static_cast<size_t>(std::max<int64_t>(1, panel_floats)));
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t chunk = pair / blocks, block = pair % blocks;
      const auto [begin, end] = pack(block, panel.data());
      const int64_t chunk_end = std::min(rows, (chunk + 1) * kRowChunk);
      for (int64_t row0 = chunk * kRowChunk; row0 < chunk_end; row0 += kRows) {
        const int64_t count = std::min<int64_t>(kRows, chunk_end - row0);
        const float* a_rows[kRows];
        for (int r = 0; r < kRows; ++r) a_rows[r] = a + (row0 + std::min<int64_t>(r, count - 1)) * a_stride + begin;
        float acc[kRows][kCols];
        block_product(a_rows, 1, panel.data(), kCols, end - begin, acc);
        store(block, row0, count, acc);
      }
    }
  });
}

template <typename T>
void made_linear_typed(const MadeLinearParams<T>& p, const Staircase& s) {
  const int64_t in = p.in_features, out = p.out_features;
  const AlignedFloats x = permuted_columns(p.x, p.rows, in, s.in_order, in);
  const auto pack = [&](int64_t block, float* panel) {
    const int64_t k0 = block * kCols, count = std::min<int64_t>(kCols, out - k0);
    const int64_t len = s.seen[k0 + count - 1];  // the block's longest prefix
    for (int64_t t = 0; t < len; ++t) {
      for (int64_t c = 0; c < kCols; ++c) {
        const bool seen = c < count && t < s.seen[k0 + c];
        panel[t * kCols + c] = seen ? p.weight[s.out_order[k0 + c] * in + s.in_order[t]] : 0.0f;
      }
    }
    return std::pair<int64_t, int64_t>(0, len);
  };
  const auto store = [&](int64_t block, int64_t row0, int64_t rows, const float (&acc)[kRows][kCols]) {
    const int64_t k0 = block * kCols, count = std::min<int64_t>(kCols, out - k0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < count; ++c) {
        const int64_t k = s.out_order[k0 + c];
        p.y[(row0 + r) * out + k] = static_cast<T>(acc[r][c] + (p.bias != nullptr ? p.bias[k] : 0.0f));
      }
    }
  };
  panel_products(x.data(), p.rows, in, (out + kCols - 1) / kCols, in * kCols, pack, store);
}

void made_linear_backward_impl(const MadeLinearBackwardParams& p, const Staircase& s) {
  const MadeLinearParams<float>& f = p.forward;
  const int64_t rows = f.rows, in = f.in_features, out = f.out_features;
  // grad_x = g (W * M): blocks of 16 sorted inputs; an input is seen by a suffix of the sorted outputs.
  const AlignedFloats g = permuted_columns(p.grad_y, rows, out, s.out_order, out);
  const auto pack = [&](int64_t block, float* panel) {
    const int64_t j0 = block * kCols, count = std::min<int64_t>(kCols, in - j0);
    const int64_t begin = s.first_seeing[j0];  // the block's longest suffix
    for (int64_t t = begin; t < out; ++t) {
      for (int64_t c = 0; c < kCols; ++c) {
        const bool seen = c < count && t >= s.first_seeing[j0 + c];
        panel[(t - begin) * kCols + c] = seen ? f.weight[s.out_order[t] * in + s.in_order[j0 + c]] : 0.0f;
      }
    }
    return std::pair<int64_t, int64_t>(begin, out);
  };
  const auto store = [&](int64_t block, int64_t row0, int64_t n, const float (&acc)[kRows][kCols]) {
    const int64_t j0 = block * kCols, count = std::min<int64_t>(kCols, in - j0);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < count; ++c) p.grad_x[(row0 + r) * in + s.in_order[j0 + c]] = acc[r][c];
    }
  };
  panel_products(g.data(), rows, out, (in + kCols - 1) / kCols, out * kCols, pack, store);
  // grad_weight = (g^T x) * M: blocks of 8 sorted outputs against 16 sorted inputs, only the inputs
  // the block's outputs see, summing over chunks of samples in order (each chunk's x in cache).
  const int64_t stride = padded(in);
  const AlignedFloats x = permuted_columns(f.x, rows, in, s.in_order, stride);
  std::fill(p.grad_weight, p.grad_weight + out * in, 0.0f);
  for (int64_t row0 = 0; row0 < rows; row0 += kRowChunk) {
    const int64_t chunk_rows = std::min(kRowChunk, rows - row0);
    at::parallel_for(0, (out + kRows - 1) / kRows, 1, [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        const int64_t k0 = block * kRows, count = std::min<int64_t>(kRows, out - k0);
        const float* a_rows[kRows];  // columns of g: g^T's rows
        for (int r = 0; r < kRows; ++r) a_rows[r] = g.data() + row0 * out + k0 + std::min<int64_t>(r, count - 1);
        const int64_t len = s.seen[k0 + count - 1];
        for (int64_t j0 = 0; j0 < len; j0 += kCols) {
          float acc[kRows][kCols];
          block_product(a_rows, out, x.data() + row0 * stride + j0, stride, chunk_rows, acc);
          for (int64_t r = 0; r < count; ++r) {
            const int64_t k = s.out_order[k0 + r];
            for (int64_t c = 0; c < kCols && j0 + c < s.seen[k0 + r]; ++c) {
              p.grad_weight[k * in + s.in_order[j0 + c]] += acc[r][c];
            }
          }
        }
      }
    });
  }
  at::parallel_for(0, out, 64, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      float sum = 0.0f;
      for (int64_t r = 0; r < rows; ++r) sum += g[r * out + k];
      p.grad_bias[s.out_order[k]] = sum;
    }
  });
}

at::Tensor made_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& in_degrees, const at::Tensor& out_degrees, bool strict) {
  const MadeLinearTensors t = prepare_made_linear(x, weight, bias, in_degrees, out_degrees);
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (y.numel() == 0) return y;
  const Staircase s = staircase(made_linear_params<float, float>(t, strict, at::Tensor()));
  const auto run = [&](auto type) {
    using T = decltype(type);
    made_linear_typed(made_linear_params<T, T>(t, strict, y), s);
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: run(at::BFloat16{}); break;
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> made_linear_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& in_degrees,
                                                                        const at::Tensor& out_degrees, bool strict) {
  const MadeLinearTensors t = prepare_made_linear(x, weight, std::nullopt, in_degrees, out_degrees);
  MadeLinearGradTensors g = prepare_made_linear_grads(grad_y, t);
  const MadeLinearBackwardParams params = made_linear_backward_params(t, strict, g);
  made_linear_backward_impl(params, staircase(params.forward));
  return finish_made_linear_grads(g, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("made_linear", &made_linear_cpu);
  m.impl("made_linear_backward", &made_linear_backward_cpu);
}

}  // namespace genfast
