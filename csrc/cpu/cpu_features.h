// Hot CPU loops are compiled for several instruction sets and picked at load time, so one
// build runs well on any x86-64 machine. Elsewhere they compile once, for the build target.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(GENFAST_NO_CLONES)
#define GF_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GF_CPU_CLONES
#endif

// For the helpers of GF_CPU_CLONES functions: a helper that is not inlined is compiled once, for the
// baseline instruction set, where each 16-float vector operation becomes a run of SSE ones.
#define GF_CPU_INLINE inline __attribute__((always_inline))
