// Per-sample sums of squares of the Philox noise, on the CPU (see kernels/common/noise_norms.h).
#pragma once

#include "../../kernels/common/noise_norms.h"

namespace genfast {

void noise_norms_cpu(const NoiseNormsParams& params);

}  // namespace genfast
