// N consecutive elements moved as one aligned access (kernels/tests/cuda_emulator.h runs it on the host).
#pragma once

namespace genfast {

// Four floats or eight 16-bit values: 16 bytes; four 16-bit values: 8.
template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
  T v[N];
};

}  // namespace genfast
