#include "cpu_features.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

#if GF_HAS_AMX_TILES
#include <cpuid.h>
#endif
#if GF_HAS_AMX_TILES && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace genfast {

namespace {

// Whether the process may use AMX's bfloat16 tiles: the CPU has them and a tile palette (some
// virtual machines list AMX with none, where configuring tiles faults), and the OS grants their
// registers (Linux on request: their 8 KiB of state then joins the process's context, signal frames
// included, so they are asked for only where the capability may take them).
bool amx_tiles_usable() {
#if GF_HAS_AMX_TILES && defined(__linux__)
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
  unsigned palettes = 0, unused_b = 0, unused_c = 0, unused_d = 0;
  if (!__get_cpuid_count(0x1D, 0, &palettes, &unused_b, &unused_c, &unused_d) || palettes < 1) return false;
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}

// The widest capability up to `cap`. The features checked are those GF_CPU_TARGET_AMX,
// GF_CPU_TARGET_AVX512_BF16, GF_CPU_TARGET_AVX512 and GF_CPU_TARGET_AVX2 compile for.
CpuCapability widest_supported(CpuCapability cap) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();  // libgcc's checks include the OS's saving of the AVX and AVX-512 registers
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
    return CpuCapability::kDefault;
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    if (!__builtin_cpu_supports("avx512bf16")) return CpuCapability::kAvx512;
    const bool tiles = cap >= CpuCapability::kAvx512Amx && amx_tiles_usable();
    return tiles ? CpuCapability::kAvx512Amx : CpuCapability::kAvx512Bf16;
  }
  return CpuCapability::kAvx2;
#else
  return CpuCapability::kDefault;
#endif
}

}  // namespace

const char* cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::kAvx512Amx:
      return "avx512_amx";
    case CpuCapability::kAvx512Bf16:
      return "avx512_bf16";
    case CpuCapability::kAvx512:
      return "avx512";
    case CpuCapability::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

CpuCapability detect_cpu_capability() {
  const char* requested = std::getenv("GENFAST_CPU_CAPABILITY");
  if (requested == nullptr || *requested == '\0') return widest_supported(CpuCapability::kAvx512Amx);
  for (const CpuCapability c :
       {CpuCapability::kDefault, CpuCapability::kAvx2, CpuCapability::kAvx512, CpuCapability::kAvx512Bf16,
        CpuCapability::kAvx512Amx}) {
    if (std::string(requested) == cpu_capability_name(c)) return std::min(c, widest_supported(c));
  }
  throw std::invalid_argument(
      std::string("GENFAST_CPU_CAPABILITY must be default, avx2, avx512, avx512_bf16 or avx512_amx (or unset), got '") +
      requested + "'");
}

}  // namespace genfast
