// Hot CPU loops are compiled for several instruction sets, and the widest the CPU has is picked
// when one is first called, so one build runs well on any x86-64 machine: AVX-512 (the F, VL, BW
// and DQ of x86-64-v4), AVX2 with FMA (x86-64-v3), and the build's baseline (SSE2 on x86-64; NEON on
// aarch64, the only one there). avx512_bf16 is AVX-512 with AVX512-BF16's products on bfloat16
// pairs, which the few kernels that use them (bfloat16_pairs.h) check for; avx512_amx adds AMX's
// tiles of bfloat16 products (bfloat16_tiles.h) where the OS lets the process use their registers;
// everything else runs its AVX-512 code there. GENFAST_CPU_CAPABILITY=avx512_bf16, =avx512, =avx2 or
// =default caps the choice, as ATEN_CPU_CAPABILITY caps torch's, so that the narrower code can be
// tested and measured on a wider machine; genfast.build_info()["cpu_capability"] says which runs.
//
// A hot function is written once as a template on the capability, name_for<isa, ...>, inlined
// (GF_CPU_INLINE) into one entry point per instruction set; GF_CPU_DISPATCH(name) defines those
// and name(args...), which calls the one for this CPU. The capability is a compile-time constant in
// the body, so that it can choose vector widths and register tiles (cpu_vectors.h).
#pragma once

namespace genfast {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAvx512Amx = 4 };

// The widest this CPU and its OS support, capped by GENFAST_CPU_CAPABILITY (read on the first call;
// an unknown value is an error naming the variable and what it takes).
CpuCapability detect_cpu_capability();
const char* cpu_capability_name(CpuCapability capability);

inline CpuCapability cpu_capability() {
  static const CpuCapability capability = detect_cpu_capability();
  return capability;
}

}  // namespace genfast

// Whether the compiler has AMX's intrinsics and feature checks (GCC 11, clang 18; x86-64 only): else
// the CPU kernels never take tiles.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 18) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define GF_HAS_AMX_TILES 1
#else
#define GF_HAS_AMX_TILES 0
#endif

// For a hot function's body and helpers: a helper that is not inlined is compiled once, for the
// baseline instruction set.
#define GF_CPU_INLINE inline __attribute__((always_inline))

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define GF_CPU_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#define GF_CPU_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// The entry points are templates over the body's further template arguments (T...) and its
// arguments' types, so that one macro serves every signature.
#define GF_CPU_DISPATCH(name)                                                                   \
  template <auto... T, typename... Args>                                                        \
  GF_CPU_TARGET_AVX512 auto name##_avx512(Args... args) {                                       \
    return name##_for<::genfast::CpuCapability::kAvx512, T...>(args...);                        \
  }                                                                                             \
  template <auto... T, typename... Args>                                                        \
  GF_CPU_TARGET_AVX2 auto name##_avx2(Args... args) {                                           \
    return name##_for<::genfast::CpuCapability::kAvx2, T...>(args...);                          \
  }                                                                                             \
  template <auto... T, typename... Args>                                                        \
  __attribute__((noinline)) auto name##_default(Args... args) {                                 \
    return name##_for<::genfast::CpuCapability::kDefault, T...>(args...);                       \
  }                                                                                             \
  template <auto... T, typename... Args>                                                        \
  inline auto name(Args... args) {                                                              \
    switch (::genfast::cpu_capability()) {                                                      \
      case ::genfast::CpuCapability::kAvx512Amx:                                                \
      case ::genfast::CpuCapability::kAvx512Bf16:                                               \
      case ::genfast::CpuCapability::kAvx512:                                                   \
        return name##_avx512<T...>(args...);                                                    \
      case ::genfast::CpuCapability::kAvx2:                                                     \
        return name##_avx2<T...>(args...);                                                      \
      default:                                                                                  \
        return name##_default<T...>(args...);                                                   \
    }                                                                                           \
  }
#else
#define GF_CPU_DISPATCH(name)                                                   \
  template <auto... T, typename... Args>                                        \
  inline auto name(Args... args) {                                              \
    return name##_for<::genfast::CpuCapability::kDefault, T...>(args...);       \
  }
#endif
