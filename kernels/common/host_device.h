// Lets one header serve g++ (the CPU kernels, the host tests) and nvcc (the CUDA kernels).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GF_HOST_DEVICE inline
#endif

// For the per-element maths called from the CPU kernels' vector loops: inlined even where g++
// would rather call (a call in the loop stops its vectorization).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define GF_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define GF_HOST_DEVICE_INLINE inline __attribute__((always_inline))
#endif
