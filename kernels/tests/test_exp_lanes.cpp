// Host test of kernels/common/exp_lanes.h, the CPU attention's exponentials on AVX-512:
// exp_nonpositive_lanes (bit for bit) and its coarse form against exp_nonpositive and libm over
// every 127th nonpositive float bit pattern (NaN included) and every float in the band where
// results turn to zero. Built and run by CMake (ctest); skipped on a CPU without AVX-512.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../common/exp_lanes.h"
#include "../common/elementary_math.h"

static int failures = 0;

static float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

// n a multiple of 16
__attribute__((target("avx512f"))) static void exp_lanes(const float* x, float* out, size_t n, bool coarse) {
  for (size_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    _mm512_storeu_ps(out + i, coarse ? genfast::exp_nonpositive_lanes_coarse(v) : genfast::exp_nonpositive_lanes(v));
  }
}

// exp_nonpositive compiled as the CPU kernels' AVX-512 code compiles it, its multiply-adds
// contracted (g++'s default outside ISO C): the values exp_nonpositive_lanes is to give bit for bit.
__attribute__((target("avx512f,fma"))) static void exp_scalar(const float* x, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = genfast::exp_nonpositive(x[i]);
}

// The float distance between two finite floats of one sign (0 for equal ones).
static double float_steps(float a, float b) {
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  return std::fabs(static_cast<double>(ua) - static_cast<double>(ub));
}

// A failure, printed for the first few.
#define FAIL(...)                                              \
  do {                                                         \
    if (++failures <= 10) std::printf("FAIL: " __VA_ARGS__);   \
  } while (0)

// Within `ulps` of libm (units of 2^-24 of the value, as test_common_math's) and `steps` floats of
// exp_nonpositive (0: the same bits).
static void check(const char* name, const std::vector<float>& xs, bool coarse, double ulps_most, double steps_most) {
  std::vector<float> got(xs.size()), scalars(xs.size());
  exp_lanes(xs.data(), got.data(), xs.size(), coarse);
  exp_scalar(xs.data(), scalars.data(), xs.size());
  double worst_libm = 0.0, worst_scalar = 0.0;
  float worst_libm_at = 0.0f, worst_scalar_at = 0.0f;
  for (size_t i = 0; i < xs.size(); ++i) {
    const float x = xs[i], e = got[i], scalar = scalars[i];
    if (std::isnan(x)) {
      if (!std::isnan(e)) FAIL("e^NaN = %g\n", e);
      continue;
    }
    if (x < -87.7f) {  // n = floor(x log2 e + 1/2) <= -127: 0, as the scalar code builds 2^n
      if (e != 0.0f || scalar != 0.0f) FAIL("e^%.9g = %g (scalar %g), not 0\n", x, e, scalar);
      continue;
    }
    if (std::isnan(e) || std::isnan(scalar)) {
      FAIL("e^%.9g = %g, scalar %g\n", x, e, scalar);
      continue;
    }
    const double steps = float_steps(e, scalar);
    if (steps > worst_scalar) worst_scalar = steps, worst_scalar_at = x;
    const double want = std::exp(static_cast<double>(x));
    if (x >= -87.3f) {  // normal results
      const double ulps = std::fabs(e - want) / (want * 5.960464477539063e-8);
      if (ulps > worst_libm) worst_libm = ulps, worst_libm_at = x;
    } else if (!(std::fabs(e - want) <= 2.9e-45 || (e == 0.0f && x < -87.68f))) {  // two subnormal steps
      FAIL("e^%.9g = %g\n", x, e);
    }
  }
  if (worst_libm >= ulps_most) FAIL("%s: %.2f ulp from libm at %.9g\n", name, worst_libm, worst_libm_at);
  if (worst_scalar > steps_most) {
    FAIL("%s: %.0f steps from exp_nonpositive at %.9g\n", name, worst_scalar, worst_scalar_at);
  }
  std::printf("%s, %zu values: within %.2f ulp of libm, %.0f steps of exp_nonpositive\n", name, xs.size(), worst_libm,
              worst_scalar);
}

int main() {
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("no AVX-512 on this CPU: exp_nonpositive_lanes not run\n");
    return 77;  // ctest's skip (SKIP_RETURN_CODE)
  }
  std::vector<float> xs = {0.0f, -0.0f, -INFINITY, NAN, -NAN, -87.7f, -87.3f, -104.0f, -1e-45f};
  for (uint64_t b = 0x80000000u; b <= 0xFFFFFFFFu; b += 127) xs.push_back(from_bits(static_cast<uint32_t>(b)));
  for (float x = -89.0f; x < -86.0f; x = std::nextafter(x, 0.0f)) xs.push_back(x);  // where results turn to 0
  while (xs.size() % 16 != 0) xs.push_back(-1.0f);
  check("exp_nonpositive_lanes", xs, false, 2.0, 0.0);
  check("exp_nonpositive_lanes_coarse", xs, true, 3.4, 4.0);  // a relative 2e-7
  std::printf("%d failed\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
