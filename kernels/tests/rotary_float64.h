// The rotary turn in float64, written out apart from kernels/common/rotary.h, for the emulated CUDA
// kernels' host tests.
#pragma once

#include <vector>

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
