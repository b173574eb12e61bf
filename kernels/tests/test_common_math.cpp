// Host tests of kernels/common: Philox known answers, the Box-Muller polynomials against libm,
// the denoise formula's NaN handling, attention's score terms, float16/bfloat16 bits as float32 and
// the rotary turn, its positions and the cache rows of kvcache_append. Built and run by CMake (ctest).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "../common/affine_coupling.h"
#include "../common/attention.h"
#include "../common/denoise_step.h"
#include "../common/float16_bits.h"
#include "../common/kvcache_append.h"
#include "../common/nade.h"
#include "../common/rotary.h"
#include "../common/philox.h"

static int failures = 0;

#define EXPECT(cond, ...)                               \
  do {                                                  \
    if (!(cond)) {                                      \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
      std::printf(__VA_ARGS__);                         \
      std::printf("\n");                                \
      ++failures;                                       \
    }                                                   \
  } while (0)

static void test_philox_known_answers() {
  using genfast::Uint4x32;
  struct Case {
    Uint4x32 counter;
    genfast::PhiloxKey key;
    Uint4x32 expected;
  } cases[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627E8D5u, 0xE169C58Du, 0xBC57AC4Cu, 0x9B00DBD8u}},
      {{0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu},
       {0xFFFFFFFFu, 0xFFFFFFFFu},
       {0x408F276Du, 0x41C83B0Eu, 0xA20BC7C6u, 0x6D5451FDu}},
      {{0x243F6A88u, 0x85A308D3u, 0x13198A2Eu, 0x03707344u},
       {0xA4093822u, 0x299F31D0u},
       {0xD16CFE09u, 0x94FDCCEBu, 0x5001E420u, 0x24126EA1u}},
  };
  for (const Case& c : cases) {
    const Uint4x32 got = genfast::philox4x32_10(c.counter, c.key);
    EXPECT(got.x == c.expected.x && got.y == c.expected.y && got.z == c.expected.z && got.w == c.expected.w,
           "philox4x32_10 gave %08x %08x %08x %08x", got.x, got.y, got.z, got.w);
  }
}

static void test_log_against_libm() {
  double worst = 0;
  for (uint32_t k = 0; k < (1u << 24); k += 97) {
    const float u = genfast::uniform_open_zero(k << 8);
    const double err = std::fabs(genfast::log_positive(u) - std::log(static_cast<double>(u)));
    const double rel = err / std::fmax(std::fabs(std::log(static_cast<double>(u))), 1e-30);
    worst = std::fmax(worst, std::fmin(err, rel));
  }
  EXPECT(worst < 3e-7, "log_positive: worst error %g", worst);
}

static void test_cos_sin_against_libm() {
  double worst = 0;
  for (uint32_t k = 0; k < (1u << 24); k += 89) {
    float c, s;
    genfast::cos_sin_turns(k << 8, &c, &s);
    const double angle = 2.0 * M_PI * k / double(1u << 24);
    worst = std::fmax(worst, std::fmax(std::fabs(c - std::cos(angle)), std::fabs(s - std::sin(angle))));
  }
  EXPECT(worst < 3e-7, "cos_sin_turns: worst error %g", worst);
}

static void test_normals_are_finite_at_extremes() {
  const genfast::Float4x32 n = genfast::box_muller4({0u, 0xFFFFFFFFu, 0xFFFFFFFFu, 0u});
  EXPECT(std::isfinite(n.x) && std::isfinite(n.y) && std::isfinite(n.z) && std::isfinite(n.w),
         "box_muller4 gave a non-finite value at extreme words");
  EXPECT(std::fabs(n.x) < 6.0f, "the smallest uniform gives |z| = %g, expected < 6", n.x);
}

static void test_clamp_keeps_nan() {
  EXPECT(std::isnan(genfast::clamp_keep_nan(NAN, -1.0f, 1.0f)), "clamp_keep_nan dropped a NaN");
  EXPECT(genfast::clamp_keep_nan(3.0f, -1.0f, 1.0f) == 1.0f, "clamp_keep_nan did not clamp from above");
  EXPECT(genfast::clamp_keep_nan(-3.0f, -1.0f, 1.0f) == -1.0f, "clamp_keep_nan did not clamp from below");
}

// Relative error in units of float32 rounding, against the double-precision libm value.
static double ulps(float got, double want) {
  if (std::isnan(want)) return std::isnan(got) ? 0.0 : 1e30;
  if (std::isinf(want)) return got == want ? 0.0 : 1e30;
  const double scale = std::max(std::fabs(want), 1.17549435e-38);
  return std::fabs(got - want) / (scale * 5.960464477539063e-8);
}

static void test_elementary_math_against_libm() {
  struct Fn {
    const char* name;
    float (*ours)(float);
    double (*libm)(double);
    float lo, hi;
  } fns[] = {
      {"exp_f32", genfast::exp_f32, [](double v) { return std::exp(v); }, -103.0f, 88.7f},
      {"log_f32", genfast::log_f32, [](double v) { return std::log(v); }, 1e-44f, 3e38f},
      {"log1p_f32", genfast::log1p_f32, [](double v) { return std::log1p(v); }, 0.0f, 1e6f},
      {"tanh_f32", genfast::tanh_f32, [](double v) { return std::tanh(v); }, -20.0f, 20.0f},
      {"atan_f32", genfast::atan_f32, [](double v) { return std::atan(v); }, -1e6f, 1e6f},
  };
  for (const Fn& fn : fns) {
    double worst = 0.0;
    float worst_at = 0.0f;
    for (int i = 0; i <= 200000; ++i) {
      // Uniform steps, then geometric ones where the range spans orders of magnitude.
      const double f = i / 200000.0;
      const float v = fn.lo > 0 ? static_cast<float>(fn.lo * std::pow(fn.hi / fn.lo, f))
                                : static_cast<float>(fn.lo + (fn.hi - fn.lo) * f);
      const double e = ulps(fn.ours(v), fn.libm(v));
      if (e > worst) worst = e, worst_at = v;
    }
    // exp of a denormal result loses relative precision, as libm's float exp does there.
    EXPECT(worst < 4.0 || (fn.ours == genfast::exp_f32 && worst_at < -87.0f), "%s is %.1f ulp off at %g", fn.name,
           worst, worst_at);
    EXPECT(std::isnan(fn.ours(NAN)), "%s dropped a NaN", fn.name);
  }
  EXPECT(genfast::exp_f32(-200.0f) == 0.0f && std::isinf(genfast::exp_f32(200.0f)), "exp_f32 limits");
  EXPECT(std::isinf(genfast::log_f32(0.0f)) && genfast::log_f32(0.0f) < 0, "log_f32(0) must be -inf");
  EXPECT(std::isnan(genfast::log_f32(-1.0f)), "log_f32(-1) must be NaN");
  EXPECT(genfast::tanh_f32(INFINITY) == 1.0f && genfast::atan_f32(-INFINITY) == -1.5707963267948966f,
         "tanh_f32 / atan_f32 at infinity");
  EXPECT(genfast::softplus_f32(-100.0f) > 0.0f && genfast::softplus_f32(100.0f) == 100.0f, "softplus_f32 limits");
}

static void test_exp_nonpositive() {
  double worst = 0.0;
  float worst_at = 0.0f;
  for (int i = 0; i <= 400000; ++i) {
    const float v = -87.0f * static_cast<float>(i) / 400000.0f;
    const double e = ulps(genfast::exp_nonpositive(v), std::exp(static_cast<double>(v)));
    if (e > worst) worst = e, worst_at = v;
  }
  EXPECT(worst < 2.0, "exp_nonpositive is %.2f ulp off at %g", worst, worst_at);
  EXPECT(genfast::exp_nonpositive(0.0f) == 1.0f && genfast::exp_nonpositive(-200.0f) == 0.0f &&
             genfast::exp_nonpositive(-INFINITY) == 0.0f && std::isnan(genfast::exp_nonpositive(NAN)),
         "exp_nonpositive limits");
}

// The soft-cap and ALiBi terms of attention_score, which the CPU kernel's rows also call.
static void test_attention_score_terms() {
  double worst = 0.0;
  for (int i = -4000; i <= 4000; ++i) {
    const float x = static_cast<float>(i) * 0.025f, cap = 5.0f;
    float t = 0.0f;
    const float capped = genfast::soft_capped(x, cap, t);
    const double exact = 5.0 * std::tanh(static_cast<double>(x) / 5.0);
    worst = std::max(worst, std::fabs(capped - exact) / std::max(std::fabs(exact), 1e-30));
    EXPECT(capped == cap * t, "soft_capped(%g) is not cap times the tanh it returns", x);
  }
  EXPECT(worst < 1e-6, "soft_capped is %.3g off relative to cap tanh(x / cap)", worst);
  float t = 0.0f;
  EXPECT(genfast::soft_capped(1e30f, 2.0f, t) == 2.0f && t == 1.0f, "soft_capped saturates at the cap");
  EXPECT(std::isnan(genfast::soft_capped(NAN, 2.0f, t)) && std::isnan(t), "soft_capped keeps NaN");
  EXPECT(genfast::alibi_bias(0.5f, int64_t{-7}) == 3.5f && genfast::alibi_bias(0.5f, int32_t{7}) == 3.5f &&
             genfast::alibi_bias(0.25f, int64_t{0}) == 0.0f,
         "alibi_bias is slope * |distance| for int32 and int64 distances");
}

// attention_lse_with_sink against log(e^lse + e^sink) in float64, and its limits.
static void test_attention_lse_with_sink() {
  double worst = 0.0;
  for (int i = -300; i <= 300; ++i) {
    for (int s = -3; s <= 3; ++s) {
      const float lse = static_cast<float>(i) * 0.37f, sink = static_cast<float>(s) * 11.0f + 0.5f;
      const double exact = std::max<double>(lse, sink) + std::log1p(std::exp(-std::fabs(double(lse) - sink)));
      worst = std::max(worst, std::fabs(genfast::attention_lse_with_sink(lse, sink) - exact) / std::max(1.0, std::fabs(exact)));
    }
  }
  EXPECT(worst < 1e-6, "attention_lse_with_sink is %.3g off", worst);
  EXPECT(genfast::attention_lse_with_sink(-INFINITY, 1.5f) == 1.5f && genfast::attention_lse_with_sink(2.0f, -INFINITY) == 2.0f &&
             genfast::attention_lse_with_sink(-INFINITY, -INFINITY) == -INFINITY,
         "attention_lse_with_sink: a row that saw no key has the sink's lse, and a sink of -inf changes nothing");
  EXPECT(std::isnan(genfast::attention_lse_with_sink(NAN, 1.0f)) && std::isnan(genfast::attention_lse_with_sink(1.0f, NAN)) &&
             std::isnan(genfast::attention_lse_with_sink(NAN, -INFINITY)),
         "attention_lse_with_sink keeps NaN");
  EXPECT(genfast::attention_lse_with_sink(INFINITY, 0.0f) == INFINITY, "attention_lse_with_sink at +inf");
}

// Every bit pattern of a 16-bit float with mantissa_bits (float16 10, bfloat16 7) against its value by
// the format's definition (ldexp).
static void expect_16_bit_values(const char* name, int mantissa_bits, float (*convert)(uint16_t)) {
  const int top = mantissa_bits == 10 ? 31 : 255, bias = top / 2;
  int wrong = 0;
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const int exponent = (bits >> mantissa_bits) & top, mantissa = bits & ((1 << mantissa_bits) - 1);
    const double sign = (bits & 0x8000u) != 0 ? -1.0 : 1.0;
    const double want = exponent == 0     ? sign * std::ldexp(mantissa, 1 - bias - mantissa_bits)
                        : exponent == top ? (mantissa == 0 ? sign * INFINITY : NAN)
                                          : sign * std::ldexp((1 << mantissa_bits) + mantissa,
                                                              exponent - bias - mantissa_bits);
    const float got = convert(static_cast<uint16_t>(bits));
    const bool same = std::isnan(want) ? std::isnan(got) : got == want && std::signbit(got) == std::signbit(want);
    if (!same && ++wrong <= 3) std::printf("%s bits %04x: got %.9g, want %.9g\n", name, bits, got, want);
  }
  EXPECT(wrong == 0, "%d %s bit patterns convert wrongly", wrong, name);
}

static void test_float16_bits() {
  expect_16_bit_values("float16", 10, [](uint16_t h) { return genfast::float16_bits_value(h); });
  expect_16_bit_values("bfloat16", 7, [](uint16_t h) { return genfast::bfloat16_bits_value(h); });
  EXPECT(genfast::float16_bits_value(0xFC00u) == -INFINITY && genfast::bfloat16_bits_value(0xFF80u) == -INFINITY,
         "-inf, which hides a key in an additive mask, converts to -inf");
}

static void test_nade_sigmoid() {
  double worst = 0.0;
  float worst_at = 0.0f;
  for (int i = 0; i <= 400000; ++i) {
    const float v = -87.0f + 174.0f * static_cast<float>(i) / 400000.0f;
    const double e = ulps(genfast::nade_sigmoid(v), 1.0 / (1.0 + std::exp(-static_cast<double>(v))));
    if (e > worst) worst = e, worst_at = v;
  }
  EXPECT(worst < 4.0, "nade_sigmoid is %.2f ulp off at %g", worst, worst_at);
  EXPECT(genfast::nade_sigmoid(0.0f) == 0.5f && genfast::nade_sigmoid(200.0f) == 1.0f &&
             genfast::nade_sigmoid(-200.0f) == 0.0f && genfast::nade_sigmoid(INFINITY) == 1.0f &&
             genfast::nade_sigmoid(-INFINITY) == 0.0f,
         "nade_sigmoid limits");
  EXPECT(std::isnan(genfast::nade_sigmoid(NAN)), "nade_sigmoid dropped a NaN");
}

static void test_scale_terms_are_consistent() {
  using genfast::ScaleFn;
  const ScaleFn fns[] = {ScaleFn::kExp, ScaleFn::kSigmoid, ScaleFn::kSoftplus, ScaleFn::kTanh,
                         ScaleFn::kAtan, ScaleFn::kSoftBound, ScaleFn::kSigmoidNoEps};
  for (const ScaleFn fn : fns) {
    const float p = fn == ScaleFn::kSigmoid || fn == ScaleFn::kSoftplus ? 1e-3f : 2.0f;
    for (float u = -30.0f; u <= 30.0f; u += 0.37f) {
      const genfast::ScaleTerms s = genfast::scale_terms(fn, p, u);
      EXPECT(std::fabs(std::log(s.scale) - s.log_scale) < 2e-6 * std::max(1.0f, std::fabs(s.log_scale)),
             "fn %d at u = %g: log(scale) %g != log_scale %g", static_cast<int>(fn), u, std::log(s.scale),
             s.log_scale);
      EXPECT(std::fabs(s.scale * s.inv_scale - 1.0f) < 1e-6, "fn %d at u = %g: scale * inv_scale != 1",
             static_cast<int>(fn), u);
      // d log s / du against a central difference in double precision of log s
      const double h = 1e-3;
      const double numeric = (genfast::scale_terms(fn, p, u + h).log_scale -
                              genfast::scale_terms(fn, p, u - h).log_scale) / (2 * h);
      EXPECT(std::fabs(numeric - s.dlog) < 2e-3 * std::max(1.0, std::fabs(numeric)) + 1e-3,
             "fn %d at u = %g: dlog %g, numeric %g", static_cast<int>(fn), u, s.dlog, numeric);
    }
  }
}

// A turn by the angle a keeps the pair's norm and composes: turning by a then by b is turning by a + b.
static void test_rotary_turn() {
  const float x1 = 0.75f, x2 = -1.25f;
  for (float a : {0.0f, 0.3f, 1.7f, -2.9f}) {
    float y1, y2, z1, z2;
    genfast::rotary_turn(x1, x2, std::cos(a), std::sin(a), &y1, &y2);
    EXPECT(std::fabs(std::hypot(y1, y2) - std::hypot(x1, x2)) < 1e-6f, "turn by %g changes the norm", a);
    genfast::rotary_turn(y1, y2, std::cos(0.4f), std::sin(0.4f), &z1, &z2);
    genfast::rotary_turn(x1, x2, std::cos(a + 0.4f), std::sin(a + 0.4f), &y1, &y2);
    EXPECT(std::fabs(z1 - y1) < 1e-5f && std::fabs(z2 - y2) < 1e-5f, "turns by %g and 0.4 do not compose", a);
    genfast::rotary_turn(y1, y2, std::cos(a + 0.4f), genfast::rotary_sine(std::sin(a + 0.4f), true), &z1, &z2);
    EXPECT(std::fabs(z1 - x1) < 1e-5f && std::fabs(z2 - x2) < 1e-5f, "the inverse turn by %g does not undo it", a);
    EXPECT(genfast::rotary_sine(std::sin(a), false) == std::sin(a), "the forward turn's sine changed");
  }
  float y1, y2;
  genfast::rotary_turn(NAN, 1.0f, 1.0f, 0.0f, &y1, &y2);
  EXPECT(std::isnan(y1) && std::isnan(y2), "NaN does not propagate through a turn");
  int64_t first, second;
  genfast::rotary_plane(3, 8, true, &first, &second);
  EXPECT(first == 6 && second == 7, "interleaved plane 3: (%lld, %lld)", (long long)first, (long long)second);
  genfast::rotary_plane(3, 8, false, &first, &second);
  EXPECT(first == 3 && second == 11, "GPT-NeoX plane 3: (%lld, %lld)", (long long)first, (long long)second);
}

// Feature by feature (as the CUDA kernel turns a head), the turn equals the pairs' turn, in both layouts.
static void test_rotary_features_match_the_planes() {
  const int64_t half = 5, dim = 2 * half;
  float x[dim], c[half], s[half];
  for (int64_t j = 0; j < dim; ++j) x[j] = 0.37f * static_cast<float>(j) - 1.1f;
  for (int64_t m = 0; m < half; ++m) {
    c[m] = std::cos(0.7f * static_cast<float>(m) + 0.2f);
    s[m] = std::sin(0.7f * static_cast<float>(m) + 0.2f);
  }
  for (bool interleaved : {true, false}) {
    for (int64_t m = 0; m < half; ++m) {
      int64_t first, second;
      genfast::rotary_plane(m, half, interleaved, &first, &second);
      float y1, y2;
      genfast::rotary_turn(x[first], x[second], c[m], s[m], &y1, &y2);
      for (const auto& [j, expected] : {std::pair<int64_t, float>{first, y1}, {second, y2}}) {
        const int64_t plane = genfast::rotary_plane_of(j, half, interleaved);
        const int64_t partner = genfast::rotary_partner(j, half, interleaved);
        const float y = genfast::rotary_feature(j, half, interleaved, x[j], x[partner], c[plane], s[plane]);
        EXPECT(plane == m && y == expected, "%s feature %lld: plane %lld, %g instead of %g",
               interleaved ? "interleaved" : "GPT-NeoX", (long long)j, (long long)plane, y, expected);
      }
    }
  }
}

// Rows of a padded cache (by cache_batch_idx), of a paged cache (by block_table), and query positions.
static void test_kvcache_rows() {
  const int32_t held[2] = {5, 9};
  const int32_t batch_idx[2] = {3, 1};
  const int32_t table[2 * 3] = {4, 0, 2, 1, 5, 3};
  genfast::KvcacheAppendParams<float> p{};
  p.cache_seqlens = held;
  const int64_t strides[3] = {1000, 10, 1};
  EXPECT(genfast::kvcache_row_offset(p, 1, 2, strides) == 1 * 1000 + 11 * 10, "padded row");
  p.cache_batch_idx = batch_idx;
  EXPECT(genfast::kvcache_row_offset(p, 0, 1, strides) == 3 * 1000 + 6 * 10, "cache_batch_idx row");
  p.cache_batch_idx = nullptr;
  p.block_table = table;
  p.table_width = 3;
  p.page_size = 4;  // sequence 1's position 9 + 2 = 11 is row 3 of its page 2, block_table[1, 2] = 3
  EXPECT(genfast::kvcache_row_offset(p, 1, 2, strides) == 3 * 1000 + 3 * 10, "paged row");
  EXPECT(genfast::kvcache_row_offset(p, 0, 0, strides) == 0 * 1000 + 1 * 10, "paged row of page 1");
  p.queries_in_sequence = true;
  EXPECT(genfast::kvcache_query_position(p, 1, 2) == 11, "query position in sequence");
  p.queries_in_sequence = false;
  EXPECT(genfast::kvcache_query_position(p, 1, 2) == 9, "query position at the cache's end");
}

// genfast::rotary's positions by their strides: (batch, seqlen), or one row broadcast (stride 0).
static void test_rotary_positions() {
  const int32_t positions[2 * 3] = {7, 8, 9, 0, 1, 2};
  genfast::RotaryParams<float> p{};
  p.positions = positions;
  p.position_strides[0] = 3;
  p.position_strides[1] = 1;
  EXPECT(genfast::rotary_position(p, 1, 2) == 2 && genfast::rotary_position(p, 0, 1) == 8, "rotary positions");
  p.position_strides[0] = 0;
  EXPECT(genfast::rotary_position(p, 1, 2) == 9, "rotary positions broadcast over the batch");
}

int main() {
  test_rotary_turn();
  test_rotary_positions();
  test_rotary_features_match_the_planes();
  test_kvcache_rows();
  test_elementary_math_against_libm();
  test_scale_terms_are_consistent();
  test_exp_nonpositive();
  test_nade_sigmoid();
  test_attention_score_terms();
  test_attention_lse_with_sink();
  test_float16_bits();
  test_philox_known_answers();
  test_log_against_libm();
  test_cos_sin_against_libm();
  test_normals_are_finite_at_extremes();
  test_clamp_keeps_nan();
  std::printf("%d failed\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
