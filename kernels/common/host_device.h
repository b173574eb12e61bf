// Lets one header serve g++ (the CPU kernels, the host tests) and nvcc (the CUDA kernels).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GF_HOST_DEVICE inline
#endif
