#include "cpu_features.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace genfast {

namespace {

// Whether the process may use AMX's tile registers: Linux hands them out on request (their 8 KiB of
// state then joins the process's context), and other systems are not asked.
bool amx_tiles_granted() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}

// The features checked are those GF_CPU_TARGET_AMX, GF_CPU_TARGET_AVX512_BF16, GF_CPU_TARGET_AVX512
// and GF_CPU_TARGET_AVX2 compile for.
CpuCapability widest_supported() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();  // libgcc's checks include the OS's saving of the AVX and AVX-512 registers
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
    return CpuCapability::kDefault;
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    if (!__builtin_cpu_supports("avx512bf16")) return CpuCapability::kAvx512;
    const bool tiles = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && amx_tiles_granted();
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
  const CpuCapability widest = widest_supported();
  const char* requested = std::getenv("GENFAST_CPU_CAPABILITY");
  if (requested == nullptr || *requested == '\0') return widest;
  for (const CpuCapability c :
       {CpuCapability::kDefault, CpuCapability::kAvx2, CpuCapability::kAvx512, CpuCapability::kAvx512Bf16,
        CpuCapability::kAvx512Amx}) {
    if (std::string(requested) == cpu_capability_name(c)) return c < widest ? c : widest;
  }
  throw std::invalid_argument(
      std::string("GENFAST_CPU_CAPABILITY must be default, avx2, avx512, avx512_bf16 or avx512_amx (or unset), got '") +
      requested + "'");
}

}  // namespace genfast
