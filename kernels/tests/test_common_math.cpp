// Host tests of kernels/common: Philox known answers, the Box-Muller polynomials against libm,
// and the denoise formula's NaN handling. Built and run by CMake (ctest).
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "../common/denoise_step.h"
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

int main() {
  test_philox_known_answers();
  test_log_against_libm();
  test_cos_sin_against_libm();
  test_normals_are_finite_at_extremes();
  test_clamp_keeps_nan();
  std::printf("%d failed\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
