// The CUDA attention kernels (kernels/cuda/attention_forward.cu, attention_backward.cu), run on the
// host by cuda_emulator.h through their launchers, against a float64 evaluation of
// kernels/common/attention.h's definition: outputs, log-sum-exp and every gradient, for each
// head-dim bucket, dtype and option, with dense, strided, unaligned and packed (varlen) inputs, and
// batches 2^31 elements apart (64-bit offsets).
// Outputs start as NaN, so an element the kernels never write fails too. Built and run by CMake (ctest).
#include "cuda_emulator.h"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "../cuda/attention_backward.cu"
#include "../cuda/attention_forward.cu"
#include "../cuda/attention_forward_sm90.cu"
#include "../cuda/attention_backward_sm90.cu"
#include "../cuda/attention_row_deltas.cu"

namespace {

using genfast::AttentionBias;
using genfast::AttentionCudaGrads;
using genfast::AttentionCudaParams;
using genfast::AttentionForwardPlan;
using genfast::AttentionMask;
using genfast::AttentionParams;
using genfast::AttentionSequence;

int failures = 0;
constexpr double kInf = HUGE_VAL;
// The wgmma products of run_case's last Hopper forward, and of its last deterministic Hopper backward.
long hopper_forward_products = 0, hopper_backward_products = 0;

template <typename T>
uint16_t to_bits(float v) {
  if constexpr (std::is_same<T, __half>::value) return __half_as_ushort(__float2half_rn(v));
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <typename T>
float from_bits(uint16_t b) {
  if constexpr (std::is_same<T, __half>::value) return __half2float(__ushort_as_half(b));
  return __bfloat162float(__ushort_as_bfloat16(b));
}

struct Case {
  std::string name;
  int batch = 1, heads = 2, kv_heads = 1, q_len = 70, k_len = 230, dim = 64, v_dim = 64;
  std::vector<int> lengths_q, lengths_k;  // varlen when set
  std::vector<int> used_k;  // varlen: seqused_k, the keys each sequence uses; its other rows' k and v NaN
  int page_size = 0;  // varlen: the forward also reads k and v from a paged copy, pages of this size
  bool seq_major = false;                 // dense inputs stored (B, L, H, D)
  bool unaligned = false;                 // every input one element past a 16-byte boundary
  int64_t band_lo = -genfast::kAttentionUnbounded, band_hi = genfast::kAttentionUnbounded;
  float softcap = 0.0f, dropout_p = 0.0f;
  bool alibi = false;
  bool sinks = false;  // attention sinks: head 0's -inf (no effect), the others' of either sign
  AttentionMask mask = AttentionMask::kNone;
  bool sparse_mask = false;  // the mask also hides keys past the bottom-right diagonal, and odd batches' second half
  int hidden_from = -1;       // when >= 0, the mask hides every key from queries hidden_from on
  bool bias_in_dtype = false;  // an additive mask stored in the inputs' float16 or bfloat16, not float32
  bool nan_q = false;  // q[0, 0, 1, 0] = NaN: that row's output is NaN, no other
  bool far_batches = false;  // dense k and v whose batches lie 2^31 elements apart: 64-bit offsets
};

constexpr int64_t kFarBatchStride = int64_t(1) << 31;

// An input tensor: 16-bit values after an optional pad element, in memory mapped without
// reserving it, so that a view spread over 2^31 elements costs only the pages it touches.
template <typename T>
struct Input {
  uint16_t* bits = nullptr;
  size_t bytes = 0;
  int pad = 0;
  Input() = default;
  Input(const Input&) = delete;
  Input& operator=(const Input&) = delete;
  ~Input() {
    if (bits != nullptr) munmap(bits, bytes);
  }
  const T* data() const { return reinterpret_cast<const T*>(bits + pad); }
  float at(int64_t i) const { return from_bits<T>(bits[pad + i]); }
  void set(int64_t i, float value) { bits[pad + i] = to_bits<T>(value); }
};

// Storage of `extent` elements whose elements [start, start + count) of each (start, count) are
// standard normal values rounded to T.
template <typename T>
void random_input(Input<T>& x, int64_t extent, const std::vector<std::pair<int64_t, int64_t>>& filled,
                  std::mt19937& rng, bool unaligned) {
  std::normal_distribution<float> normal;
  x.pad = unaligned ? 1 : 0;
  x.bytes = static_cast<size_t>(extent + 8) * sizeof(uint16_t);
  void* memory = mmap(nullptr, x.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    std::printf("FAIL: cannot map %zu bytes\n", x.bytes);
    std::exit(1);
  }
  x.bits = static_cast<uint16_t*>(memory);
  for (const auto& [start, count] : filled) {
    for (int64_t i = start; i < start + count; ++i) x.set(i, normal(rng));
  }
}

// Element strides (batch, head, position) of q, k or v.
void strides_of(const Case& c, bool keys, int64_t heads, int64_t len, int64_t dim, int64_t (&s)[3]) {
  if (!c.lengths_q.empty()) {  // (total, heads, dim)
    s[0] = 0;
    s[1] = dim;
    s[2] = heads * dim;
  } else if (c.far_batches && keys) {  // k and v: (B, Hk, L, D), batches 2^31 apart
    s[0] = kFarBatchStride;
    s[1] = len * dim;
    s[2] = dim;
  } else if (c.seq_major) {  // (B, L, H, D)
    s[0] = len * heads * dim;
    s[1] = dim;
    s[2] = heads * dim;
  } else {
    s[0] = heads * len * dim;
    s[1] = len * dim;
    s[2] = dim;
  }
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::isfinite(x) ? std::fmax(m, std::fabs(x)) : m;
  return m;
}

// got against ref: max |got - ref| <= tol max(1, max |ref|), matching infinities and NaN.
void compare(const std::string& what, const std::vector<float>& got, const std::vector<double>& ref, double tol) {
  const double bound = tol * std::fmax(1.0, max_abs(ref));
  double worst = 0.0;
  int64_t worst_at = -1;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = got[i], r = ref[i];
    if ((std::isnan(g) && std::isnan(r)) || (std::isinf(r) && g == r)) continue;
    const double err = std::isfinite(r) && std::isfinite(g) ? std::fabs(g - r) : kInf;
    if (worst_at < 0 || err > worst) {
      worst = err;
      worst_at = static_cast<int64_t>(i);
    }
  }
  if (std::getenv("GENFAST_EMULATOR_VERBOSE") != nullptr) {
    std::printf("%-60s max |error| %.3g, bound %.3g\n", what.c_str(), worst, bound);
  }
  if (worst_at >= 0 && worst > bound) {
    std::printf("FAIL %s: |error| %.3g > %.3g at %lld (got %g, expected %g)\n", what.c_str(), worst, bound,
                static_cast<long long>(worst_at), got[worst_at], ref[worst_at]);
    ++failures;
  }
}

// The forward's plans tried on each case: a tile per head without splits, the plan of a GPU with
// 132 SMs (small cases split their keys there), and every head of a group stacked in a tile with
// the keys in 3 splits (when the plan above is not that).
std::vector<AttentionForwardPlan> plans_of(const AttentionParams& p) {
  std::vector<AttentionForwardPlan> plans{{1, 1}, genfast::plan_attention_forward(p, 132)};
  const int group = static_cast<int>(p.heads / p.kv_heads);
  const AttentionForwardPlan stacked{std::min(group, 64), 3};
  if (plans[1].heads_per_cta != stacked.heads_per_cta || plans[1].splits != stacked.splits) plans.push_back(stacked);
  return plans;
}

template <typename T>
void run_case(const Case& c) {
  const bool varlen = !c.lengths_q.empty();
  const std::string name = c.name + (std::is_same<T, __half>::value ? " float16" : " bfloat16");
  std::mt19937 rng(1234);
  AttentionParams p{};
  std::vector<int32_t> cu_q{0}, cu_k{0};
  int64_t total_q = 0, total_k = 0;
  if (varlen) {
    p.batch = static_cast<int64_t>(c.lengths_q.size());
    for (size_t b = 0; b < c.lengths_q.size(); ++b) {
      cu_q.push_back(cu_q.back() + c.lengths_q[b]);
      cu_k.push_back(cu_k.back() + c.lengths_k[b]);
      p.q_len = std::max<int64_t>(p.q_len, c.lengths_q[b]);
      p.k_len = std::max<int64_t>(p.k_len, c.lengths_k[b]);
    }
    total_q = cu_q.back();
    total_k = cu_k.back();
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
    if (!c.used_k.empty()) p.seqused_k = c.used_k.data();
    p.total_q = total_q;
    p.total_k = total_k;
  } else {
    p.batch = c.batch;
    p.q_len = c.q_len;
    p.k_len = c.k_len;
    total_q = c.batch * c.q_len;
    total_k = c.batch * c.k_len;
  }
  p.heads = c.heads;
  p.kv_heads = c.kv_heads;
  p.dim = c.dim;
  p.v_dim = c.v_dim;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.dim));
  p.softcap = c.softcap;
  p.band_lo = c.band_lo;
  p.band_hi = c.band_hi;
  p.dropout_p = c.dropout_p;
  p.key = genfast::PhiloxKeyRef{77, 5, nullptr, nullptr};
  strides_of(c, false, c.heads, p.q_len, c.dim, p.q_stride);
  strides_of(c, true, c.kv_heads, p.k_len, c.dim, p.k_stride);
  strides_of(c, true, c.kv_heads, p.k_len, c.v_dim, p.v_stride);

  Input<T> q, k, v;
  random_input(q, total_q * c.heads * c.dim, {{0, total_q * c.heads * c.dim}}, rng, c.unaligned);
  for (auto [x, width] : {std::pair{&k, c.dim}, std::pair{&v, c.v_dim}}) {
    const int64_t size = total_k * c.kv_heads * width;
    if (c.far_batches) {
      const int64_t batch_size = p.k_len * c.kv_heads * width;
      std::vector<std::pair<int64_t, int64_t>> batches;
      for (int64_t b = 0; b < p.batch; ++b) batches.push_back({b * kFarBatchStride, batch_size});
      random_input(*x, (p.batch - 1) * kFarBatchStride + batch_size, batches, rng, c.unaligned);
    } else {
      random_input(*x, size, {{0, size}}, rng, c.unaligned);
    }
  }
  if (c.nan_q) q.set(p.q_stride[2], NAN);
  // The rows no sequence uses (past seqused_k): NaN, as an uninitialized KV cache may hold. Each
  // (b, hk, j) of them, with the sequence's own k_len ignored.
  const auto for_each_unused_key = [&](const auto& visit) {
    for (size_t b = 0; b < c.used_k.size(); ++b) {
      for (int64_t j = c.used_k[b]; j < c.lengths_k[b]; ++j) {
        for (int64_t hk = 0; hk < c.kv_heads; ++hk) visit(static_cast<int64_t>(b), hk, j);
      }
    }
  };
  for_each_unused_key([&](int64_t b, int64_t hk, int64_t j) {
    const AttentionSequence seq = genfast::attention_sequence(p, b);
    for (int d = 0; d < c.dim; ++d) k.set(genfast::attention_k_at(p, seq, b, hk, j) + d, NAN);
    for (int d = 0; d < c.v_dim; ++d) v.set(genfast::attention_v_at(p, seq, b, hk, j) + d, NAN);
  });
  const int64_t rows = total_q * c.heads, scores = rows * p.k_len;
  std::vector<float> slopes(c.heads), additive;
  std::vector<uint16_t> additive_bits;
  std::vector<uint8_t> keep_mask;
  if (c.alibi) {
    for (int h = 0; h < c.heads; ++h) slopes[h] = 0.5f / (h + 1);
    p.alibi_slopes = slopes.data();
  }
  std::vector<float> sinks(c.heads);
  if (c.sinks) {
    for (int h = 0; h < c.heads; ++h) sinks[h] = h == 0 ? -INFINITY : 2.5f * (h % 2 == 0 ? h : -h);
    p.sinks = sinks.data();
  }
  if (c.mask != AttentionMask::kNone) {  // (B, 1, Lq, Lk), broadcast over heads; query 3 sees no key
    p.mask_kind = c.mask;
    const int64_t stride[4] = {p.q_len * p.k_len, 0, p.k_len, 1};
    std::copy(stride, stride + 4, p.mask_stride);
    std::uniform_real_distribution<float> uniform;
    std::normal_distribution<float> normal;
    keep_mask.resize(p.batch * p.q_len * p.k_len);
    additive.resize(keep_mask.size());
    for (size_t e = 0; e < keep_mask.size(); ++e) {
      const int64_t b = e / (p.q_len * p.k_len), i = (e / p.k_len) % p.q_len, j = e % p.k_len;
      const bool hidden = i == 3 || (c.hidden_from >= 0 && i >= c.hidden_from) ||
                          (c.sparse_mask && (j > i + p.k_len - p.q_len || (b % 2 == 1 && 2 * j >= p.k_len)));
      const bool kept = uniform(rng) < 0.7f;
      const float bias = normal(rng);
      keep_mask[e] = !hidden && kept;
      additive[e] = hidden ? -HUGE_VALF : bias;
    }
    p.mask = c.mask == AttentionMask::kBool ? static_cast<const void*>(keep_mask.data()) : additive.data();
    if (c.mask == AttentionMask::kAdditive && c.bias_in_dtype) {
      for (float a : additive) additive_bits.push_back(to_bits<T>(a));
      p.mask = additive_bits.data();
      p.bias_type = std::is_same<T, __half>::value ? AttentionBias::kFloat16 : AttentionBias::kBFloat16;
    }
  }

  // The float64 reference of one row: its probabilities, dropout's scale (0 where dropped),
  // softcapping's derivative and dp = grad_o v^T; `sees` is false for a row that sees no key (o = 0,
  // lse = -inf, no gradient).
  const int64_t group = c.heads / c.kv_heads;
  std::vector<float> grad_o(rows * c.v_dim), grad_lse(rows);
  {
    std::normal_distribution<float> normal;
    for (float& g : grad_o) g = from_bits<T>(to_bits<T>(normal(rng)));
    for (float& g : grad_lse) g = normal(rng);
  }
  uint64_t seed = 0, offset = 0;
  genfast::resolve_philox_key(p.key, &seed, &offset);
  const double keep_scale = 1.0 / (1.0 - c.dropout_p);
  struct ReferenceRow {
    bool sees = false;
    double lse = -kInf;
    std::vector<double> prob, kept, cap, dp;
  };
  const auto reference_row = [&](const AttentionSequence& seq, int64_t b, int64_t h, int64_t i) {
    const int64_t hk = h / group, row = seq.out_row(h, i);
    ReferenceRow r;
    std::vector<double> s(seq.k_len);
    r.cap.assign(seq.k_len, 1.0);
    r.kept.assign(seq.k_len, 1.0);
    double row_max = -kInf;
    for (int64_t j = 0; j < seq.k_len; ++j) {
      double dot = 0.0;
      for (int d = 0; d < c.dim; ++d) {
        dot += static_cast<double>(q.at(genfast::attention_q_at(p, seq, b, h, i) + d)) *
               k.at(genfast::attention_k_at(p, seq, b, hk, j) + d);
      }
      const float scaled = static_cast<float>(dot) * p.scale;
      s[j] = genfast::attention_score(p, seq, scaled, b, h, i, j);
      if (c.softcap > 0.0f) r.cap[j] = 1.0 - std::pow(std::tanh(scaled / c.softcap), 2);
      if (c.dropout_p > 0.0f) {
        r.kept[j] = genfast::attention_keeps(p, seq, seed, offset, h, i, j) ? keep_scale : 0.0;
      }
      row_max = std::isnan(s[j]) || std::isnan(row_max) ? NAN : std::fmax(row_max, s[j]);
    }
    r.sees = row_max != -kInf;
    const double sink = c.sinks ? sinks[h] : -kInf;
    if (!r.sees) {
      r.lse = sink;
      return r;
    }
    double sum = 0.0;
    for (int64_t j = 0; j < seq.k_len; ++j) sum += std::exp(s[j] - row_max);
    r.lse = row_max + std::log(sum);
    if (sink > r.lse) r.lse = sink + std::log1p(std::exp(r.lse - sink));
    else if (sink > -kInf) r.lse += std::log1p(std::exp(sink - r.lse));
    r.prob.resize(seq.k_len);
    r.dp.assign(seq.k_len, 0.0);
    for (int64_t j = 0; j < seq.k_len; ++j) {
      r.prob[j] = std::exp(s[j] - r.lse);
      for (int d = 0; d < c.v_dim; ++d) {
        r.dp[j] += grad_o[row * c.v_dim + d] * v.at(genfast::attention_v_at(p, seq, b, hk, j) + d);
      }
    }
    return r;
  };
  const auto for_each_row = [&](const auto& visit) {
    for (int64_t b = 0; b < p.batch; ++b) {
      const AttentionSequence seq = genfast::attention_sequence(p, b);
      for (int64_t h = 0; h < c.heads; ++h) {
        for (int64_t i = 0; i < seq.q_len; ++i) visit(seq, b, h, i);
      }
    }
  };

  // o, lse and grad_v; the other gradients take the kernel's delta, below.
  std::vector<double> ref_o(rows * c.v_dim, 0.0), ref_lse(rows, -kInf);
  std::vector<double> ref_dq(rows * c.dim, 0.0), ref_dk(total_k * c.kv_heads * c.dim, 0.0);
  std::vector<double> ref_dv(total_k * c.kv_heads * c.v_dim, 0.0), ref_ds(varlen ? 0 : scores, 0.0);
  for_each_row([&](const AttentionSequence& seq, int64_t b, int64_t h, int64_t i) {
    const ReferenceRow r = reference_row(seq, b, h, i);
    ref_lse[seq.lse_row(h, i)] = r.lse;
    if (!r.sees) return;
    const int64_t hk = h / group, row = seq.out_row(h, i);
    for (int64_t j = 0; j < seq.k_len; ++j) {
      const int64_t key = seq.key_out_row(hk, j);
      for (int d = 0; d < c.v_dim; ++d) {
        ref_o[row * c.v_dim + d] += r.prob[j] * r.kept[j] * v.at(genfast::attention_v_at(p, seq, b, hk, j) + d);
        ref_dv[key * c.v_dim + d] += r.prob[j] * r.kept[j] * grad_o[row * c.v_dim + d];
      }
    }
  });

  // The forward under each plan, through its launcher; outputs start as NaN.
  const uint16_t nan_bits = to_bits<T>(NAN);
  const bool half = std::is_same<T, __half>::value;
  AttentionCudaParams<T> params{};
  params.q = q.data();
  params.k = k.data();
  params.v = v.data();
  std::vector<float> o, lse;
  const auto forward = [&](const std::string& run, const AttentionForwardPlan& plan) {
    std::vector<uint16_t> o_bits(rows * c.v_dim, nan_bits);
    std::vector<float> workspace(genfast::attention_forward_workspace(p, plan), NAN);
    lse.assign(rows, NAN);
    p.lse = lse.data();
    params.base = p;
    params.o = reinterpret_cast<T*>(o_bits.data());
    if (genfast::launch_attention_forward<T>(params, plan, workspace.data(), nullptr) != cudaSuccess) {
      std::printf("FAIL %s: the forward's launch failed\n", run.c_str());
      ++failures;
      return false;
    }
    o.resize(o_bits.size());
    for (size_t e = 0; e < o.size(); ++e) o[e] = from_bits<T>(o_bits[e]);
    compare(run + ": o", o, ref_o, half ? 2e-3 : 1.5e-2);
    compare(run + ": lse", lse, std::vector<double>(ref_lse.begin(), ref_lse.end()), 1e-4);
    return true;
  };
  // The Hopper kernel (wgmma), as an sm_90 device with the opt-in set runs it (head dims up to 256
  // where the build has those buckets).
  cuda_emulator::capability_major = 9;
  setenv("GENFAST_ATTENTION_SM90", "1", 1);
  const bool hopper = genfast::attention_cuda::hopper_forward_applies(p, AttentionForwardPlan{});
  const long wgmma_before = cuda_emulator::wgmma_products;
  const bool hopper_ok = !hopper || forward(name + " (Hopper kernel)", AttentionForwardPlan{});
  hopper_forward_products = cuda_emulator::wgmma_products - wgmma_before;
  unsetenv("GENFAST_ATTENTION_SM90");
  cuda_emulator::capability_major = 8;
  if (hopper != (std::max(c.dim, c.v_dim) <= genfast::attention_cuda::kHopperMaxHeadDim)) {
    std::printf("FAIL %s: the Hopper kernel %s\n", name.c_str(),
                hopper ? "took a head dim past its buckets" : "was not used");
    ++failures;
  }
  // A plan's float_o: the same tiles' o in float32 (in lse's row order, after the lse). With plain
  // scores it rounds to the o that the plan without it writes (in `o` from the last forward); the
  // general kernels (a mask gradient's) of head-dim buckets up to 128 take P in two parts of T, which
  // leaves it within float32's error of the reference, where o carries P's rounding to T.
  int bucket = 0;
  genfast::attention_cuda::with_head_dim_bucket(p, [&](auto b) {
    bucket = decltype(b)::value;
    return cudaSuccess;
  });
  const bool precise_pv =
      !genfast::attention_cuda::plain_scores(p) && bucket <= genfast::attention_cuda::kPrecisePvMaxHeadDim;
  const auto float_o_rounds_to_o = [&](const std::string& run, AttentionForwardPlan plan) {
    plan.float_o = true;
    std::vector<float> workspace(genfast::attention_forward_workspace(p, plan), NAN);
    params.base = p;
    params.o = nullptr;
    if (genfast::launch_attention_forward<T>(params, plan, workspace.data(), nullptr) != cudaSuccess) {
      std::printf("FAIL %s: the float32 o's launch failed\n", run.c_str());
      ++failures;
      return;
    }
    std::vector<float> wide(o.size(), NAN);
    int64_t unlike = 0;
    for_each_row([&](const AttentionSequence& seq, int64_t, int64_t h, int64_t i) {
      for (int d = 0; d < c.v_dim; ++d) {
        const int64_t out = seq.out_row(h, i) * c.v_dim + d;
        wide[out] = workspace[rows + seq.lse_row(h, i) * c.v_dim + d];
        const float narrow = from_bits<T>(to_bits<T>(wide[out]));
        unlike += !precise_pv && !(narrow == o[out] || (std::isnan(narrow) && std::isnan(o[out])));
      }
    });
    if (unlike > 0) {
      std::printf("FAIL %s: %lld of the float32 o's elements do not round to o's\n", run.c_str(),
                  static_cast<long long>(unlike));
      ++failures;
    }
    compare(run + ": float32 o", wide, ref_o, precise_pv ? 3e-5 : half ? 2e-3 : 1.5e-2);
  };
  if (!hopper_ok) return;
  // A paged copy of k and v (kernels/common/attention.h): each sequence's keys in pages of
  // c.page_size rows, the pages in the reverse of their use, NaN in every row no key fills.
  Input<T> k_pages, v_pages;
  std::vector<int32_t> table;
  AttentionParams paged = p;
  if (c.page_size > 0) {
    const int64_t per_sequence = (p.k_len + c.page_size - 1) / c.page_size, pages = p.batch * per_sequence + 1;
    for (int64_t n = 0; n < p.batch * per_sequence; ++n) table.push_back(static_cast<int32_t>(pages - 1 - n));
    paged.block_table = table.data();
    paged.block_table_stride = per_sequence;
    paged.page_size = c.page_size;
    paged.total_k = pages * c.page_size;
    for (auto [x, width, stride] :
         {std::tuple{&k_pages, c.dim, paged.k_stride}, std::tuple{&v_pages, c.v_dim, paged.v_stride}}) {
      random_input(*x, pages * c.page_size * c.kv_heads * width, {}, rng, c.unaligned);
      for (int64_t e = 0; e < pages * c.page_size * c.kv_heads * width; ++e) x->set(e, NAN);
      stride[0] = c.page_size * c.kv_heads * width;
      stride[1] = width;
      stride[2] = c.kv_heads * width;
    }
    for (int64_t b = 0; b < p.batch; ++b) {
      const AttentionSequence seq = genfast::attention_sequence(p, b);
      for (int64_t j = 0; j < c.lengths_k[b]; ++j) {
        for (int64_t hk = 0; hk < c.kv_heads; ++hk) {
          const int64_t k_from = genfast::attention_k_at(p, seq, b, hk, j);
          const int64_t v_from = genfast::attention_v_at(p, seq, b, hk, j);
          const int64_t k_to = genfast::attention_k_at(paged, seq, b, hk, j);
          const int64_t v_to = genfast::attention_v_at(paged, seq, b, hk, j);
          for (int d = 0; d < c.dim; ++d) k_pages.set(k_to + d, k.at(k_from + d));
          for (int d = 0; d < c.v_dim; ++d) v_pages.set(v_to + d, v.at(v_from + d));
        }
      }
    }
  }
  for (const AttentionForwardPlan& plan : plans_of(p)) {
    const std::string run = name + " (" + std::to_string(plan.heads_per_cta) + " heads per tile, " +
                            std::to_string(plan.splits) + " splits)";
    if (!forward(run, plan)) return;
    if (plan.splits == 1) float_o_rounds_to_o(run, plan);
    if (c.page_size == 0) continue;
    // The same tiles from the pages: the same o and lse, bit for bit.
    const std::vector<float> o_packed = o, lse_packed = lse;
    const AttentionParams packed = p;
    p = paged;
    params.k = k_pages.data();
    params.v = v_pages.data();
    const bool launched = forward(run + ", paged", plan);
    p = packed;
    params.base = p;
    params.k = k.data();
    params.v = v.data();
    if (!launched) return;
    const auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
      for (size_t e = 0; e < a.size(); ++e) {
        if (!(a[e] == b[e] || (std::isnan(a[e]) && std::isnan(b[e])))) return false;
      }
      return a.size() == b.size();
    };
    if (!same(o, o_packed) || !same(lse, lse_packed)) {
      std::printf("FAIL %s, paged: o or lse differs from the packed keys'\n", run.c_str());
      ++failures;
    }
  }
  params.o = nullptr;  // the backward reads lse (the last plan's), not o

  // delta = rowsum(grad_o o) - grad_lse from the kernel's o, as the binding computes it. The reference
  // gradients take it too: o's rounding to T is the forward's error, checked above. Where dp and delta
  // cancel (one key under dropout: o is v / (1 - p), which T does not hold), a float64 delta would
  // charge that rounding to grad_k at many times its size.
  std::vector<float> delta(rows, 0.0f);
  for_each_row([&](const AttentionSequence& seq, int64_t, int64_t h, int64_t i) {
    const int64_t r = seq.lse_row(h, i), out = seq.out_row(h, i);
    double sum = 0.0;
    for (int d = 0; d < c.v_dim; ++d) sum += grad_o[out * c.v_dim + d] * o[out * c.v_dim + d];
    delta[r] = static_cast<float>(sum) - grad_lse[r];
  });
  for_each_row([&](const AttentionSequence& seq, int64_t b, int64_t h, int64_t i) {
    const ReferenceRow r = reference_row(seq, b, h, i);
    if (!r.sees) return;
    const int64_t row = seq.out_row(h, i), lse_row = seq.lse_row(h, i);
    for (int64_t j = 0; j < seq.k_len; ++j) {
      const double ds = r.prob[j] * (r.dp[j] * r.kept[j] - delta[lse_row]);
      if (!varlen) ref_ds[lse_row * p.k_len + j] = ds;
      const int64_t key = seq.key_out_row(h / group, j);
      for (int d = 0; d < c.dim; ++d) {
        ref_dq[row * c.dim + d] += p.scale * ds * r.cap[j] * k.at(genfast::attention_k_at(p, seq, b, h / group, j) + d);
        ref_dk[key * c.dim + d] += p.scale * ds * r.cap[j] * q.at(genfast::attention_q_at(p, seq, b, h, i) + d);
      }
    }
  });
  std::vector<uint16_t> grad_o_bits(grad_o.size());
  for (size_t e = 0; e < grad_o.size(); ++e) grad_o_bits[e] = to_bits<T>(grad_o[e]);
  const auto floats = [](const std::vector<uint16_t>& bits) {
    std::vector<float> out(bits.size());
    for (size_t e = 0; e < bits.size(); ++e) out[e] = from_bits<T>(bits[e]);
    return out;
  };
  const double grad_tol = half ? 2.5e-3 : 1.5e-2;
  // dS summed to (batches, heads, rows, Lk), each the whole dim or 1, computed `chunk` batches at a
  // time; all 0: not summed.
  struct SummedDs {
    int64_t batches, heads, rows, chunk;
  };
  const bool additive_ds = !varlen && c.mask == AttentionMask::kAdditive;
  // The summed shapes tried with an additive mask: the mask's own (B, 1, Lq, Lk) a batch at a time,
  // and a per-head bias over the keys (1, H, 1, Lk) two batches at a time.
  const SummedDs summed_shapes[2] = {{p.batch, 1, p.q_len, 1}, {1, p.heads, 1, 2}};
  // The backward, outputs starting as NaN, deterministic and with dQ added atomically (its
  // accumulator zeroed, as the binding does), dS summed or not: on the sm_80 kernels, and on the
  // Hopper ones where they take the call.
  const auto backward = [&](const std::string& run, bool atomic_dq, SummedDs summed = {}) {
    std::vector<uint16_t> dq_bits(ref_dq.size(), nan_bits), dk_bits(ref_dk.size(), nan_bits),
        dv_bits(ref_dv.size(), nan_bits);
    for_each_unused_key([&](int64_t b, int64_t hk, int64_t j) {  // zeroed, as the binding does: in no sequence
      const int64_t key = genfast::attention_sequence(p, b).key_out_row(hk, j);
      std::fill_n(dk_bits.begin() + key * c.dim, c.dim, uint16_t{0});
      std::fill_n(dv_bits.begin() + key * c.v_dim, c.v_dim, uint16_t{0});
    });
    std::vector<float> dq_accum(ref_dq.size(), 0.0f), ds_chunk;
    const SummedDs shape = summed.batches > 0 ? summed : SummedDs{p.batch, p.heads, p.q_len, 0};
    std::vector<double> ref_sum(additive_ds ? shape.batches * shape.heads * shape.rows * p.k_len : 0, 0.0);
    for (size_t e = 0; e < (additive_ds ? ref_ds.size() : 0); ++e) {
      const int64_t j = e % p.k_len, i = (e / p.k_len) % p.q_len, h = (e / p.k_len / p.q_len) % p.heads,
                    b = e / p.k_len / p.q_len / p.heads;
      ref_sum[((b % shape.batches * shape.heads + h % shape.heads) * shape.rows + i % shape.rows) * p.k_len + j] +=
          ref_ds[e];
    }
    std::vector<float> ds(ref_sum.size(), 0.0f);
    AttentionCudaGrads<T> grads{};
    grads.grad_o = reinterpret_cast<const T*>(grad_o_bits.data());
    grads.delta = delta.data();
    grads.grad_q = reinterpret_cast<T*>(dq_bits.data());
    grads.grad_k = reinterpret_cast<T*>(dk_bits.data());
    grads.grad_v = reinterpret_cast<T*>(dv_bits.data());
    grads.grad_s = additive_ds ? ds.data() : nullptr;
    grads.grad_s_batches = shape.batches, grads.grad_s_heads = shape.heads, grads.grad_s_rows = shape.rows;
    if (shape.chunk > 0) {
      ds_chunk.assign(shape.chunk * p.heads * p.q_len * p.k_len, 0.0f);
      grads.ds_chunk = ds_chunk.data();
      grads.ds_chunk_batches = shape.chunk;
    }
    grads.dq_accum = atomic_dq ? dq_accum.data() : nullptr;
    if (genfast::launch_attention_backward<T>(params, grads, nullptr) != cudaSuccess) {
      std::printf("FAIL %s: the backward's launch failed\n", run.c_str());
      ++failures;
      return;
    }
    if (std::any_of(ds_chunk.begin(), ds_chunk.end(), [](float x) { return x != 0.0f; })) {
      std::printf("FAIL %s: the dS chunk is not zero again\n", run.c_str());
      ++failures;
    }
    if (c.nan_q) return;  // NaN reaches the gradients through delta; the forward's rows were checked
    compare(run + ": grad_q", floats(dq_bits), ref_dq, grad_tol);
    compare(run + ": grad_k", floats(dk_bits), ref_dk, grad_tol);
    compare(run + ": grad_v", floats(dv_bits), ref_dv, grad_tol);
    if (grads.grad_s != nullptr) compare(run + ": grad_s", ds, ref_sum, grad_tol);
  };
  const auto backward_summed = [&](const std::string& run) {
    if (!additive_ds) return;
    for (const SummedDs& shape : summed_shapes) {
      backward(run + " (dS summed to (" + std::to_string(shape.batches) + ", " + std::to_string(shape.heads) + ", " +
                   std::to_string(shape.rows) + ", Lk), " + std::to_string(shape.chunk) + " batches at a time)",
               false, shape);
    }
  };
  backward(name, false);
  backward(name + " (atomic dQ)", true);
  backward_summed(name);
  cuda_emulator::capability_major = 9;
  setenv("GENFAST_ATTENTION_SM90", "1", 1);
  if (genfast::attention_cuda::hopper_backward_applies(p)) {
    const long backward_before = cuda_emulator::wgmma_products;
    backward(name + " (Hopper kernels)", false);
    hopper_backward_products = cuda_emulator::wgmma_products - backward_before;
    backward_summed(name + " (Hopper kernels)");
    backward(name + " (Hopper kernels, atomic dQ)", true);
  } else if (std::max(c.dim, c.v_dim) <= genfast::attention_cuda::kHopperMaxHeadDim) {
    std::printf("FAIL %s: the Hopper backward was not used\n", name.c_str());
    ++failures;
  }
  unsetenv("GENFAST_ATTENTION_SM90");
  cuda_emulator::capability_major = 8;
}

std::vector<Case> cases() {
  std::vector<Case> all;
  Case c;
  c.name = "plain GQA d64";
  all.push_back(c);
  c = Case{};
  c.name = "bottom-right causal d40 dv72";
  c.dim = 40, c.v_dim = 72, c.q_len = 50, c.k_len = 90, c.band_hi = 90 - 50;
  all.push_back(c);
  c = Case{};
  c.name = "top-left causal window d16";
  c.heads = 3, c.kv_heads = 3, c.dim = c.v_dim = 16, c.q_len = c.k_len = 33, c.band_lo = -9, c.band_hi = 0;
  all.push_back(c);
  c = Case{};
  c.name = "soft-cap ALiBi additive mask d128";
  c.batch = 2, c.dim = c.v_dim = 128, c.q_len = 65, c.k_len = 40, c.softcap = 2.0f, c.alibi = true;
  c.mask = AttentionMask::kAdditive;
  all.push_back(c);
  c = Case{};
  c.name = "bool mask dropout d256";
  c.dim = c.v_dim = 256, c.q_len = 40, c.k_len = 100, c.mask = AttentionMask::kBool, c.dropout_p = 0.25f;
  all.push_back(c);
  c = Case{};
  c.name = "odd dims, (B, L, H, D) storage, unaligned";
  c.dim = 33, c.v_dim = 17, c.q_len = 30, c.k_len = 45, c.seq_major = true, c.unaligned = true;
  all.push_back(c);
  c = Case{};
  c.name = "varlen bottom-right causal dropout d32";
  c.dim = c.v_dim = 32, c.lengths_q = {17, 0, 70}, c.lengths_k = {30, 5, 70}, c.band_hi = 0, c.dropout_p = 0.1f;
  all.push_back(c);
  c = Case{};
  c.name = "sinks, GQA, a bool mask hiding whole rows, window d64";  // decoding-like: the plans split the keys
  c.heads = 4, c.kv_heads = 2, c.q_len = 5, c.k_len = 300, c.band_lo = -200, c.mask = AttentionMask::kBool;
  c.sinks = true;
  all.push_back(c);
  c = Case{};
  c.name = "sinks, varlen causal d128";
  c.heads = 3, c.kv_heads = 1, c.dim = c.v_dim = 128, c.lengths_q = {40, 1, 0}, c.lengths_k = {40, 90, 3};
  c.band_hi = 0, c.sinks = true;
  all.push_back(c);
  c = Case{};
  c.name = "seqused_k: a padded KV cache, NaN past each sequence's keys, causal GQA d64";
  c.heads = 4, c.kv_heads = 2, c.lengths_q = {1, 3, 2, 40}, c.lengths_k = {160, 160, 160, 160};
  c.used_k = {150, 0, 64, 97}, c.band_hi = 0;
  all.push_back(c);
  c = Case{};
  c.name = "seqused_k, d128, a window";
  c.heads = 2, c.kv_heads = 2, c.dim = c.v_dim = 128, c.lengths_q = {70, 5}, c.lengths_k = {200, 200};
  c.used_k = {130, 199}, c.band_lo = -100;
  all.push_back(c);
  c = Case{};
  c.name = "paged KV cache, seqused_k, causal GQA d64";
  c.heads = 4, c.kv_heads = 2, c.lengths_q = {1, 3, 40, 2}, c.lengths_k = {300, 129, 256, 7};
  c.used_k = {300, 100, 200, 7}, c.band_hi = 0, c.page_size = 128;
  all.push_back(c);
  c.name = "paged KV cache of 16-key pages, seqused_k, causal GQA d64";  // blocks across pages: a lookup a row
  c.page_size = 16;
  all.push_back(c);
  c = Case{};
  c.name = "paged KV cache, soft-cap, ALiBi, sinks d128";
  c.heads = 2, c.kv_heads = 1, c.dim = c.v_dim = 128, c.lengths_q = {70, 1}, c.lengths_k = {200, 390};
  c.softcap = 20.0f, c.alibi = true, c.sinks = true, c.page_size = 256;
  all.push_back(c);
  c = Case{};
  c.name = "paged KV cache of 1-key pages, sinks d128";
  c.heads = 2, c.kv_heads = 1, c.dim = c.v_dim = 128, c.lengths_q = {20, 1}, c.lengths_k = {90, 150};
  c.sinks = true, c.page_size = 1;
  all.push_back(c);
  c = Case{};  // some 64-key blocks in one page, some across two; unaligned: no cp.async
  c.name = "paged KV cache of 96-key pages, unaligned, d32";
  c.heads = 2, c.kv_heads = 2, c.dim = c.v_dim = 32, c.lengths_q = {33, 2}, c.lengths_k = {250, 200};
  c.page_size = 96, c.unaligned = true;
  all.push_back(c);
  c = Case{};
  c.name = "NaN in q";
  c.dim = c.v_dim = 32, c.q_len = 20, c.k_len = 20, c.nan_q = true;
  all.push_back(c);
  c = Case{};
  c.name = "k and v batches 2^31 elements apart";
  c.batch = 2, c.dim = c.v_dim = 32, c.q_len = 20, c.k_len = 70, c.far_batches = true;
  all.push_back(c);
  c = Case{};
  c.name = "two query tiles of 128, bottom-right causal d96 dv64";
  c.dim = 96, c.v_dim = 64, c.q_len = 200, c.k_len = 300, c.band_hi = 300 - 200;
  all.push_back(c);
  c = Case{};
  c.name = "plain GQA d256, two query tiles, four key blocks of 80 on Hopper";
  c.dim = c.v_dim = 256, c.q_len = 130, c.k_len = 250;
  all.push_back(c);
  c = Case{};
  c.name = "four key blocks of 128, soft-cap dropout d128";  // (ALiBi would leave the first block no weight)
  c.heads = 1, c.dim = c.v_dim = 128, c.q_len = 72, c.k_len = 400, c.softcap = 2.0f, c.dropout_p = 0.1f;
  all.push_back(c);
  c = Case{};
  // Every fast path of the sm_80 kernels: whole key and query tiles (one cp.async per chunk),
  // products without bound tests, Q in registers, the scale folded into the exponents, paired dQ adds.
  c.name = "plain top-left causal d128, whole tiles";
  c.heads = 2, c.kv_heads = 2, c.dim = c.v_dim = 128, c.q_len = 128, c.k_len = 192, c.band_hi = 0;
  all.push_back(c);
  c = Case{};
  c.name = "72-byte rows (no TMA), one batch and head";
  c.heads = 1, c.dim = c.v_dim = 36, c.q_len = 40, c.k_len = 150;
  all.push_back(c);
  c = Case{};
  c.name = "decoding: 1 query, 4 heads per kv head, causal ALiBi dropout d128";
  c.heads = 8, c.kv_heads = 2, c.dim = c.v_dim = 128, c.q_len = 1, c.k_len = 200, c.band_hi = 199;
  c.alibi = true, c.dropout_p = 0.2f;
  all.push_back(c);
  c = Case{};
  c.name = "3 queries, 7 heads per kv head, bool mask hiding the last key block of batch 1, d64";
  c.batch = 2, c.heads = 14, c.kv_heads = 2, c.q_len = 3, c.k_len = 130, c.mask = AttentionMask::kBool;
  c.sparse_mask = true;
  all.push_back(c);
  c = Case{};
  // Rows of 128 bytes: the forward stages the mask's blocks by cp.async (BoolMaskTiles).
  c.name = "bool mask on whole tiles hiding blocks, d128";
  c.batch = 2, c.heads = 2, c.kv_heads = 1, c.dim = c.v_dim = 128, c.q_len = 128, c.k_len = 128;
  c.mask = AttentionMask::kBool, c.sparse_mask = true;
  all.push_back(c);
  c = Case{};
  c.name = "5 queries, 3 heads per kv head, bool mask of 16-byte rows over 112 keys, d64";
  c.batch = 2, c.heads = 6, c.kv_heads = 2, c.q_len = 5, c.k_len = 112, c.mask = AttentionMask::kBool;
  all.push_back(c);
  c = Case{};
  // Warpgroups (and, in the backward, steps) with queries that see no key at all: zeros, lse -inf.
  c.name = "additive mask hiding every key from queries 64 on, d64";
  c.q_len = 150, c.k_len = 200, c.mask = AttentionMask::kAdditive, c.hidden_from = 64;
  all.push_back(c);
  c = Case{};
  c.name = "additive mask in the inputs' dtype hiding blocks, soft-cap d80";
  c.batch = 2, c.dim = c.v_dim = 80, c.q_len = 100, c.k_len = 150, c.softcap = 2.0f;
  c.mask = AttentionMask::kAdditive, c.sparse_mask = true, c.bias_in_dtype = true;
  all.push_back(c);
  c = Case{};
  c.name = "varlen decoding, a sequence without keys d64";
  c.heads = 4, c.kv_heads = 1, c.lengths_q = {1, 1, 2}, c.lengths_k = {50, 0, 130}, c.band_hi = 0;
  all.push_back(c);
  c = Case{};
  // On Hopper: the cp.async kernels with dQ by atomics at head dim 128, with key blocks whose keys
  // all fall to the first warpgroup (the second's dS must read as zeros).
  c.name = "varlen plain d96, key blocks of at most 64 keys";
  c.dim = c.v_dim = 96, c.lengths_q = {50, 70}, c.lengths_k = {40, 150};
  all.push_back(c);
  c = Case{};
  c.name = "no keys";
  c.dim = c.v_dim = 32, c.q_len = 5, c.k_len = 0;
  all.push_back(c);
  return all;
}

// A random case for --fuzz: shapes around the tile edges (16, 64, 80, 128 rows; head-dim buckets),
// every option at random, named by its parameters so that a failure can be written down as a case.
Case random_case(std::mt19937& rng) {
  const auto pick = [&](std::initializer_list<int> values) {
    return *(values.begin() + std::uniform_int_distribution<size_t>(0, values.size() - 1)(rng));
  };
  const auto chance = [&](double p) { return std::uniform_real_distribution<double>()(rng) < p; };
  const auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const auto length = [&] {
    return chance(0.5) ? pick({0, 1, 2, 15, 16, 17, 63, 64, 65, 79, 80, 81, 127, 128, 129, 160, 200})
                       : uniform(1, 300);
  };
  const auto head_dim = [&] {
    return chance(0.6) ? pick({8, 16, 32, 33, 40, 63, 64, 65, 96, 127, 128, 129, 192, 255, 256}) : uniform(1, 256);
  };
  Case c;
  c.kv_heads = uniform(1, 3);
  c.heads = c.kv_heads * pick({1, 1, 2, 3, 4, 8});
  c.dim = head_dim();
  c.v_dim = chance(0.6) ? c.dim : head_dim();
  if (chance(0.3)) {
    const int batch = uniform(1, 4);
    for (int b = 0; b < batch; ++b) {
      c.lengths_q.push_back(length());
      c.lengths_k.push_back(chance(0.3) ? c.lengths_q.back() : length());
    }
  } else {
    c.batch = uniform(1, 3);
    c.q_len = length();
    c.k_len = length();
    c.seq_major = chance(0.3);
    c.far_batches = !c.seq_major && chance(0.1);
    const int mask = uniform(0, 5);
    c.mask = mask == 0 ? AttentionMask::kBool : mask == 1 ? AttentionMask::kAdditive : AttentionMask::kNone;
    c.sparse_mask = c.mask != AttentionMask::kNone && chance(0.5);
  }
  c.unaligned = chance(0.2);
  const int band = uniform(0, 5);
  if (band == 1 || band == 3) c.band_hi = c.lengths_q.empty() ? 0 : uniform(-5, 5);
  if (band == 2) c.band_hi = c.lengths_q.empty() ? c.k_len - c.q_len : 0;
  if (band == 3 || band == 4) c.band_lo = -uniform(0, 100);
  if (chance(0.25)) c.softcap = 2.0f;
  if (chance(0.25)) c.alibi = true;
  if (chance(0.25)) c.dropout_p = pick({1, 10, 30}) / 100.0f;
  c.bias_in_dtype = c.mask == AttentionMask::kAdditive && chance(0.5);
  c.name = "fuzz: heads " + std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) + ", dims " +
           std::to_string(c.dim) + "/" + std::to_string(c.v_dim);
  if (c.lengths_q.empty()) {
    c.name += ", batch " + std::to_string(c.batch) + ", lengths " + std::to_string(c.q_len) + "/" +
              std::to_string(c.k_len) + (c.seq_major ? ", (B, L, H, D)" : "") + (c.far_batches ? ", far batches" : "") +
              (c.mask == AttentionMask::kBool       ? ", bool mask"
               : c.mask == AttentionMask::kAdditive ? ", additive mask"
                                                    : "") +
              (c.bias_in_dtype ? " in the dtype" : "") +
              (c.sparse_mask ? " hiding blocks" : "");
  } else {
    c.name += ", varlen";
    for (size_t b = 0; b < c.lengths_q.size(); ++b) {
      c.name += " " + std::to_string(c.lengths_q[b]) + "/" + std::to_string(c.lengths_k[b]);
    }
  }
  const auto bound = [](int64_t v) {
    return v <= -genfast::kAttentionUnbounded ? std::string("-inf")
           : v >= genfast::kAttentionUnbounded ? std::string("inf")
                                                : std::to_string(v);
  };
  c.name += ", band [" + bound(c.band_lo) + ", " + bound(c.band_hi) + "]" + (c.unaligned ? ", unaligned" : "") +
            (c.softcap > 0.0f ? ", soft-cap" : "") + (c.alibi ? ", ALiBi" : "") +
            (c.dropout_p > 0.0f ? ", dropout " + std::to_string(static_cast<int>(c.dropout_p * 100 + 0.5f)) + "%" : "");
  return c;
}

}  // namespace

// The plans a GPU of 132 SMs gets: decoding stacks a group's heads and splits the keys (4 heads per
// tile, 32 splits of 2 key blocks); training shapes fill the GPU as they are; packed sequences stack
// a group's heads however long the longest (without GENFAST_ATTENTION_SM90=1). tests/
// test_attention_plans.py checks the same figures of the Triton launcher's forward_plan.
void check_plans() {
  AttentionParams p{};
  p.batch = 1, p.heads = 32, p.kv_heads = 8, p.q_len = 1, p.k_len = 4096, p.dim = p.v_dim = 128;
  const AttentionForwardPlan decoding = genfast::plan_attention_forward(p, 132);
  p.batch = 2, p.heads = p.kv_heads = 8, p.q_len = p.k_len = 1024, p.dim = p.v_dim = 64;
  const AttentionForwardPlan training = genfast::plan_attention_forward(p, 132);
  p.q_len = 1, p.k_len = 64;  // one key block: nothing to split
  const AttentionForwardPlan short_keys = genfast::plan_attention_forward(p, 132);
  // Eight packed sequences of 8 kv heads, the longest of 512 queries: a group of 4 per tile, as dense
  // ones of that length do not stack.
  p.batch = 8, p.heads = 32, p.kv_heads = 8, p.q_len = 512, p.k_len = 4096, p.dim = p.v_dim = 128;
  const AttentionForwardPlan dense = genfast::plan_attention_forward(p, 132);
  const std::vector<int32_t> cu_seqlens(9, 0);  // the plan reads only that there are some
  p.cu_seqlens_q = p.cu_seqlens_k = cu_seqlens.data();
  const AttentionForwardPlan packed = genfast::plan_attention_forward(p, 132);
  if (decoding.heads_per_cta != 4 || decoding.splits != 32 || training.heads_per_cta != 1 || training.splits != 1 ||
      short_keys.splits != 1 || dense.heads_per_cta != 1 || packed.heads_per_cta != 4 || packed.splits != 1) {
    std::printf("FAIL plans: decoding %d heads per tile, %d splits; training %d, %d; short keys %d splits; "
                "dense 512 queries %d heads per tile, packed %d, %d splits\n",
                decoding.heads_per_cta, decoding.splits, training.heads_per_cta, training.splits, short_keys.splits,
                dense.heads_per_cta, packed.heads_per_cta, packed.splits);
    ++failures;
  }
}

// A mask that hides whole key blocks (past the diagonal, and the second half of the odd batch's keys)
// skips them: the sm_80 kernels and the Hopper cp.async ones (tensor maps refused), forward and
// backward, run at most 3/4 of the mma.sync and of the wgmma products that a mask of the same kind
// hiding no whole block takes (about 0.6 and 0.7 here; skipping in one pass alone stays above); so
// do the warp-specialized Hopper kernels (TMA), forward and backward, each warpgroup skipping what
// its 64 rows or keys do not see (about 0.6 of the forward's products and 0.7 of the backward's
// here; where the build has the 64 bucket, which takes these head dims warp-specialized); and the
// results match the reference (run_case).
void check_hidden_blocks_skipped() {
  for (AttentionMask kind : {AttentionMask::kBool, AttentionMask::kAdditive}) {
    if ((GENFAST_ATTENTION_BUCKETS & 2) == 0) break;
    Case c;
    c.batch = 2, c.dim = c.v_dim = 32, c.q_len = c.k_len = 150, c.mask = kind;
    long forward[2], backward[2];
    for (bool sparse : {false, true}) {
      c.sparse_mask = sparse;
      c.name = std::string(kind == AttentionMask::kBool ? "bool" : "additive") + " mask d32, TMA" +
               (sparse ? " hiding blocks" : "");
      run_case<__nv_bfloat16>(c);
      forward[sparse] = hopper_forward_products;
      backward[sparse] = hopper_backward_products;
    }
    if (forward[0] == 0 || 4 * forward[1] > 3 * forward[0] || backward[0] == 0 || 4 * backward[1] > 3 * backward[0]) {
      std::printf("FAIL %s: the warp-specialized Hopper kernels ran %ld wgmma products forward and %ld backward, "
                  "against %ld and %ld with no block hidden\n", c.name.c_str(), forward[1], backward[1], forward[0],
                  backward[0]);
      ++failures;
    }
  }
  cuda_emulator::tensor_maps_fail = true;
  for (AttentionMask kind : {AttentionMask::kBool, AttentionMask::kAdditive}) {
    Case c;
    c.batch = 2, c.dim = c.v_dim = 32, c.q_len = c.k_len = 150, c.mask = kind;
    const std::string name = kind == AttentionMask::kBool ? "bool mask d32" : "additive mask d32";
    long products[2][2];
    for (bool sparse : {false, true}) {
      c.sparse_mask = sparse;
      c.name = name + (sparse ? " hiding blocks" : "");
      const long mma = cuda_emulator::mma_products, wgmma = cuda_emulator::wgmma_products;
      run_case<__half>(c);
      products[sparse][0] = cuda_emulator::mma_products - mma;
      products[sparse][1] = cuda_emulator::wgmma_products - wgmma;
    }
    if (4 * products[1][0] > 3 * products[0][0] || 4 * products[1][1] > 3 * products[0][1]) {
      std::printf("FAIL %s hiding blocks: %ld mma.sync and %ld wgmma products, against %ld and %ld with no block "
                  "hidden\n", name.c_str(), products[1][0], products[1][1], products[0][0], products[0][1]);
      ++failures;
    }
  }
  cuda_emulator::tensor_maps_fail = false;
}

// With --fuzz SEED COUNT [FIRST]: COUNT random cases (random_case) instead of the fixed ones, each in
// both dtypes with copies landing at their waits or at once; from case FIRST on (to replay one).
// launch_attention_row_deltas against float64: grad_o stored (B, L, H, Dv), o dense, in T or float;
// head dims of no column (delta = -grad_lse), fewer than a warp's lanes and past two of its sweeps;
// with and without grad_lse; NaN in one row of o reaches that row's delta alone.
template <typename T, typename O>
void check_row_deltas() {
  constexpr int kBatches = 2, kHeads = 3, kLength = 7;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (int v_dim : {0, 5, 64, 200}) {
    const int rows = kBatches * kHeads * kLength;
    std::vector<T> grad_o(static_cast<size_t>(rows) * v_dim);
    std::vector<O> o(grad_o.size());
    std::vector<float> grad_lse(rows);
    for (auto& x : grad_o) x = static_cast<T>(normal(rng));
    for (auto& x : o) x = static_cast<O>(normal(rng));
    for (auto& x : grad_lse) x = normal(rng);
    const int nan_row = rows - 3;
    if (v_dim > 0) o[static_cast<size_t>(nan_row) * v_dim + v_dim / 2] = static_cast<O>(NAN);
    genfast::AttentionRowDeltasParams<T, O> p{};
    p.grad_o = grad_o.data();
    p.o = o.data();
    p.batches = kBatches;
    p.heads = kHeads;
    p.length = kLength;
    p.v_dim = v_dim;
    const int64_t grad_o_stride[3] = {int64_t{kLength} * kHeads * v_dim, v_dim, int64_t{kHeads} * v_dim};
    const int64_t o_stride[3] = {int64_t{kHeads} * kLength * v_dim, int64_t{kLength} * v_dim, v_dim};
    std::copy(grad_o_stride, grad_o_stride + 3, p.grad_o_stride);
    std::copy(o_stride, o_stride + 3, p.o_stride);
    for (bool with_grad_lse : {false, true}) {
      std::vector<float> delta(rows, NAN);
      p.grad_lse = with_grad_lse ? grad_lse.data() : nullptr;
      p.delta = delta.data();
      if (genfast::launch_attention_row_deltas(p, nullptr) != cudaSuccess) {
        std::printf("FAIL row deltas: launch refused\n");
        ++failures;
        continue;
      }
      std::vector<double> expected(rows);
      for (int r = 0; r < rows; ++r) {
        const int64_t b = r / (kHeads * kLength), h = r / kLength % kHeads, i = r % kLength;
        double sum = 0.0;
        for (int c = 0; c < v_dim; ++c) {
          sum += static_cast<double>(static_cast<float>(
                     grad_o[b * grad_o_stride[0] + h * grad_o_stride[1] + i * grad_o_stride[2] + c])) *
                 static_cast<double>(static_cast<float>(o[b * o_stride[0] + h * o_stride[1] + i * o_stride[2] + c]));
        }
        expected[r] = sum - (with_grad_lse ? grad_lse[r] : 0.0);
      }
      compare("row deltas, v_dim " + std::to_string(v_dim) + (with_grad_lse ? ", grad_lse" : "") +
                  (std::is_same<O, float>::value ? ", float o" : ""),
              delta, expected, 1e-5);
      int nans = 0;
      for (float d : delta) nans += std::isnan(d) ? 1 : 0;
      if (nans != (v_dim > 0 ? 1 : 0) || (v_dim > 0 && !std::isnan(delta[nan_row]))) {
        std::printf("FAIL row deltas, v_dim %d: %d rows NaN, expected NaN in row %d alone\n", v_dim, nans, nan_row);
        ++failures;
      }
    }
  }
}

int main(int argc, char** argv) {
  if ((argc == 4 || argc == 5) && std::string(argv[1]) == "--fuzz") {
    std::mt19937 rng(static_cast<unsigned>(std::stoul(argv[2])));
    const int count = std::stoi(argv[3]), first = argc == 5 ? std::stoi(argv[4]) : 0;
    for (int n = 0; n < count; ++n) {
      const Case c = random_case(rng);
      cuda_emulator::deferred_copies = (rng() & 1) != 0;
      if (n < first) continue;
      std::printf("case %d: %s\n", n, c.name.c_str());
      std::fflush(stdout);
      run_case<__half>(c);
      run_case<__nv_bfloat16>(c);
    }
    std::printf("%d failures in %d random cases\n", failures, count - std::min(first, count));
    return failures == 0 ? 0 : 1;
  }
  check_plans();
  check_hidden_blocks_skipped();
  check_row_deltas<__half, __half>();
  check_row_deltas<__nv_bfloat16, float>();
  // Each case in both dtypes, one with copies landing at their wait and one with copies landing at
  // once, alternating over the cases: the dtype and the way copies land do not interact, and each
  // run takes seconds on the emulator. A build narrowed to the 256 bucket runs each case once, the
  // four pairs of dtype and copies in turn.
  // GENFAST_EMULATOR_CASES=text runs only the cases whose names hold it (development).
  const char* only = std::getenv("GENFAST_EMULATOR_CASES");
  const std::vector<Case> all = cases();
  for (size_t n = 0; n < all.size(); ++n) {
    if (only != nullptr && all[n].name.find(only) == std::string::npos) continue;
    if (GENFAST_ATTENTION_BUCKETS == 0xF) {
      cuda_emulator::deferred_copies = n % 2 == 0;
      run_case<__half>(all[n]);
      cuda_emulator::deferred_copies = n % 2 != 0;
      run_case<__nv_bfloat16>(all[n]);
    } else {
      cuda_emulator::deferred_copies = n / 2 % 2 == 0;
      if (n % 2 == 0) run_case<__half>(all[n]);
      else run_case<__nv_bfloat16>(all[n]);
    }
  }
  cuda_emulator::deferred_copies = true;
  // Without tensor maps, the Hopper forward takes its cp.async kernel for inputs TMA would load.
  cuda_emulator::tensor_maps_fail = true;
  run_case<__nv_bfloat16>(cases().front());
  cuda_emulator::tensor_maps_fail = false;
  if (cuda_emulator::tensor_map_refusals != 0) {
    std::printf("FAIL the Hopper launcher asked for %d tensor maps TMA cannot have\n",
                cuda_emulator::tensor_map_refusals);
    ++failures;
  }
  if (failures == 0) std::printf("attention on the emulated GPU: all cases match the float64 reference\n");
  return failures == 0 ? 0 : 1;
}
