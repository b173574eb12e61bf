// The CUDA merge of partial attentions (kernels/cuda/attention_merge.cu), run on the host by
// cuda_emulator.h through its launchers, against a float64 evaluation of
// kernels/common/attention_merge.h's formulas: states interleaved in memory (o and lse strided) or
// listed out of order, more states than are listed (evenly spaced), 16-byte chunks and single
// elements (an odd head dim, an unaligned o, states whose places alone are misaligned), states
// without keys whose o is NaN (not read), a row without keys in any state, the backward with and
// without the merged lse's gradient, natural and base-2 lse, and outputs strided or in place (into
// state 1, whose lse every lane reads); float32, float16 and bfloat16. The outputs start as NaN, so a
// missed write fails.
// Built and run by CMake (ctest).
#include "cuda_emulator.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../cuda/attention_merge.cu"
#include "emulated_elements.h"

namespace {

int failures = 0;

struct Case {
  const char* name;
  int states, head_dim;
  bool offset_o;   // o one element past a 16-byte boundary: single elements
  bool grad_lse;   // the backward takes a gradient of the merged lse
  bool listed;     // the states' places listed in reverse memory order (separate tensors), not evenly spaced
  int gap;         // elements between one state's row and the next state's: a gap of 1 misaligns them
  bool base2;      // lse to base 2 (FlashInfer's), not natural
  bool in_place;   // the forward writes into state 1's o and lse (else into outputs of their own, strided)
};

void check(const char* name, const char* what, int64_t at, double got, double expected, double tolerance,
           double* worst) {
  const double error = std::fabs(got - expected) / std::max(1.0, std::fabs(expected));
  *worst = std::max(*worst, error);
  if (!(error <= tolerance)) {
    if (failures < 20) std::printf("FAIL %s: %s[%lld] %g, expected %g\n", name, what, static_cast<long long>(at), got,
                                   expected);
    ++failures;
  }
}

template <typename T>
void run_case(const Case& c) {
  const int states = c.states, outer = 2, inner = 5, rows = outer * inner, dim = c.head_dim;
  // o and lse stored (outer, inner, states, ...): the states interleaved; listed, state s is the
  // (states - 1 - s)th in memory
  // a row's states side by side, gap elements apart, the rows 16 elements aligned (with a gap, only
  // the states' places are misaligned)
  const int64_t row_stride = (states * (dim + c.gap) + 15) / 16 * 16;
  const int64_t o_strides[3] = {dim + c.gap, inner * row_stride, row_stride};
  const int64_t lse_strides[3] = {1, inner * states, states};
  auto slot = [&](int s) { return c.listed ? states - 1 - s : s; };
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  const int64_t offset = c.offset_o ? 1 : 0;
  std::vector<T> o_store(offset + rows * row_stride, from<T>(NAN));
  std::vector<float> lse(rows * states);
  for (auto& e : lse) e = 3.0f * normal(rng);
  for (int s = 0; s < states; ++s) lse[s] = -INFINITY;  // row 0: no keys anywhere
  lse[4 * states + 1] = lse[7 * states + 2] = -INFINITY;
  const T* o = o_store.data() + offset;
  for (int r = 0; r < rows; ++r) {
    for (int s = 0; s < states; ++s) {
      const bool empty = std::isinf(lse[r * states + s]);
      for (int j = 0; j < dim; ++j) {
        o_store[offset + r * row_stride + s * (dim + c.gap) + j] = from<T>(empty ? NAN : normal(rng));
      }
    }
  }
  // The inputs as they were (a merge in place overwrites state 1).
  const std::vector<T> o_given(o_store);
  const std::vector<float> lse_given(lse);
  auto o_at = [&](int s, int r, int j) {
    return static_cast<double>(as_float(o_given[offset + slot(s) * o_strides[0] + (r / inner) * o_strides[1] +
                                                (r % inner) * o_strides[2] + j]));
  };
  auto lse_at = [&](int s, int r) {
    return static_cast<double>(
        lse_given[slot(s) * lse_strides[0] + (r / inner) * lse_strides[1] + (r % inner) * lse_strides[2]]);
  };
  auto places = [&](int64_t stride) {
    genfast::AttentionMergeStates at{};
    for (int s = 0; s < genfast::AttentionMergeStates::kListed; ++s) at.listed[s] = (slot(s) - slot(0)) * stride;
    at.stride = stride;
    return at;
  };

  // Outputs of their own: rows 8 elements apart (16-byte chunks still fit), lse (inner, outer) in memory.
  const int64_t out_row = dim + 8;
  std::vector<T> out(rows * out_row, from<T>(NAN)), grad_out(rows * dim), grad_o(states * rows * dim, from<T>(NAN));
  std::vector<float> out_lse(rows, NAN), grad_lse(rows), grad_lse_states(states * rows, NAN);
  for (auto& e : grad_out) e = from<T>(normal(rng));
  for (auto& e : grad_lse) e = normal(rng);

  auto set_inputs = [&](auto& q) {
    q.states = states;
    q.rows_outer = outer;
    q.rows_inner = inner;
    q.head_dim = dim;
    q.o = o + slot(0) * o_strides[0];
    q.lse = lse.data() + slot(0) * lse_strides[0];
    for (int d = 0; d < 2; ++d) {
      q.o_strides[d] = o_strides[d + 1];
      q.lse_strides[d] = lse_strides[d + 1];
    }
    q.o_states = places(o_strides[0]);
    q.lse_states = places(lse_strides[0]);
  };
  const double ln_base = c.base2 ? std::log(2.0) : 1.0;
  genfast::AttentionMergeParams<T> p{};
  set_inputs(p);
  p.ln_base = static_cast<float>(ln_base);
  if (c.in_place) {
    p.out = o_store.data() + offset + slot(1) * o_strides[0];
    p.out_lse = lse.data() + slot(1) * lse_strides[0];
    for (int d = 0; d < 2; ++d) {
      p.out_strides[d] = o_strides[d + 1];
      p.out_lse_strides[d] = lse_strides[d + 1];
    }
  } else {
    p.out = out.data();
    p.out_lse = out_lse.data();
    p.out_strides[0] = inner * out_row;
    p.out_strides[1] = out_row;
    p.out_lse_strides[0] = 1;
    p.out_lse_strides[1] = outer;
  }
  auto out_at = [&](int r, int j) {
    return static_cast<double>(as_float(p.out[(r / inner) * p.out_strides[0] + (r % inner) * p.out_strides[1] + j]));
  };
  auto out_lse_at = [&](int r) {
    return p.out_lse[(r / inner) * p.out_lse_strides[0] + (r % inner) * p.out_lse_strides[1]];
  };
  genfast::AttentionMergeBackwardParams<T> b{};
  set_inputs(b);
  b.ln_base = p.ln_base;
  b.grad_out = grad_out.data();
  b.grad_lse = c.grad_lse ? grad_lse.data() : nullptr;
  b.grad_o = grad_o.data();
  b.grad_lse_states = grad_lse_states.data();
  // The backward first: a merge in place overwrites what it reads.
  if (genfast::launch_attention_merge_backward(b, nullptr) != cudaSuccess ||
      genfast::launch_attention_merge(p, nullptr) != cudaSuccess) {
    std::printf("FAIL %s: launch\n", c.name);
    ++failures;
    return;
  }

  double worst = 0.0;
  const double tolerance = ::tolerance<T>(), lse_tolerance = 1e-5;
  for (int r = 0; r < rows; ++r) {
    double most = -INFINITY;
    for (int s = 0; s < states; ++s) most = std::max(most, lse_at(s, r));
    double merged = -INFINITY;
    if (!std::isinf(most)) {
      double total = 0.0;
      for (int s = 0; s < states; ++s) total += std::exp((lse_at(s, r) - most) * ln_base);
      merged = most + std::log(total) / ln_base;
    }
    if (std::isinf(merged)) {
      if (!(out_lse_at(r) == -INFINITY)) {
        std::printf("FAIL %s: lse[%d] %g, expected -inf\n", c.name, r, out_lse_at(r));
        ++failures;
      }
    } else {
      check(c.name, "lse", r, out_lse_at(r), merged, lse_tolerance, &worst);
    }
    std::vector<double> weight(states), dots(states);
    double mean = 0.0;
    for (int s = 0; s < states; ++s) {
      const bool empty = std::isinf(lse_at(s, r));
      weight[s] = empty ? 0.0 : std::exp((lse_at(s, r) - merged) * ln_base);
      dots[s] = 0.0;
      for (int j = 0; j < dim && !empty; ++j) dots[s] += as_float(grad_out[r * dim + j]) * o_at(s, r, j);
      mean += weight[s] * dots[s];
    }
    for (int j = 0; j < dim; ++j) {
      double expected = 0.0;
      for (int s = 0; s < states; ++s) expected += weight[s] == 0.0 ? 0.0 : weight[s] * o_at(s, r, j);
      check(c.name, "out", r * dim + j, out_at(r, j), expected, tolerance, &worst);
    }
    for (int s = 0; s < states; ++s) {
      for (int j = 0; j < dim; ++j) {
        const int64_t at = (s * rows + r) * dim + j;
        check(c.name, "grad_o", at, as_float(grad_o[at]), weight[s] * as_float(grad_out[r * dim + j]), tolerance,
              &worst);
      }
      const double expected =
          weight[s] == 0.0 ? 0.0 : weight[s] * (ln_base * (dots[s] - mean) + (c.grad_lse ? grad_lse[r] : 0.0));
      check(c.name, "grad_lse", s * rows + r, grad_lse_states[s * rows + r], expected, 1e-4, &worst);
    }
  }
  std::printf("%-40s %-9s max rel err %.2e\n", c.name, element_name<T>(), worst);
}

}  // namespace

int main() {
  const Case cases[] = {
      {"head dim 128, 16-byte chunks", 3, 128, false, true, false, 0, false, false},
      {"head dim 40, chunks, no lse gradient", 3, 40, false, false, true, 0, false, false},
      {"head dim 7, single elements, listed", 5, 7, false, true, true, 0, false, false},
      {"head dim 64, o unaligned: single elements", 3, 64, true, true, false, 0, false, false},
      {"head dim 64, states misaligned: single", 3, 64, false, true, false, 1, false, false},
      {"11 states, 8 listed then spaced, chunks", 11, 32, false, true, false, 0, false, false},
      {"head dim 64, base-2 lse, chunks", 4, 64, false, true, false, 0, true, false},
      {"head dim 9, base-2 lse, single, listed", 3, 9, false, true, true, 0, true, false},
      {"head dim 64, in place, chunks", 3, 64, false, true, false, 0, false, true},
      {"head dim 7, in place, single, listed", 4, 7, false, true, true, 0, false, true},
  };
  for (const Case& c : cases) {
    run_case<float>(c);
    run_case<__half>(c);
    run_case<__nv_bfloat16>(c);
  }
  std::printf("%d failed\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
