// The rotary turn in float64, written out apart from kernels/common/rotary.h, and rotary tables, for
// the emulated CUDA kernels' host tests.
#pragma once

#include <cmath>
#include <vector>

#include "emulated_elements.h"

// Feature j of head row x turned at (cos, sin) of `half` planes, in float64: plane m of features
// (2m, 2m + 1) or (m, m + half), (x1, x2) -> (x1 c - x2 s, x1 s + x2 c); inverse: by -s.
inline double turned(const std::vector<double>& x, int j, const double* c, const double* s, int half,
                     bool interleaved, bool inverse = false) {
  if (j >= 2 * half) return x[j];
  const int m = interleaved ? j / 2 : j % half;
  const int first = interleaved ? 2 * m : m, second = interleaved ? 2 * m + 1 : m + half;
  const double sine = inverse ? -s[m] : s[m];
  return j == first ? x[first] * c[m] - x[second] * sine : x[first] * sine + x[second] * c[m];
}

// Rotary tables of `positions` rows of `width` entries, row pos's entry m the angle
// pos * 0.6^m + offset: in T, as the kernels read them, and the same values in float64.
template <typename T>
struct RotaryTables {
  std::vector<T> cos, sin;
  std::vector<double> cos64, sin64;

  RotaryTables(int positions, int width, double offset)
      : cos(positions * width), sin(positions * width), cos64(positions * width), sin64(positions * width) {
    for (int pos = 0; pos < positions; ++pos) {
      for (int m = 0; m < width; ++m) {
        const int at = pos * width + m;
        const double angle = pos * std::pow(0.6, m) + offset;
        cos[at] = from<T>(static_cast<float>(std::cos(angle)));
        sin[at] = from<T>(static_cast<float>(std::sin(angle)));
        cos64[at] = as_float(cos[at]);
        sin64[at] = as_float(sin[at]);
      }
    }
  }
};
