// genfast._C: the Python module that carries the operators, and what was compiled into it.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "cpu/cpu_features.h"
#include "cpu/streaming_store.h"

#ifdef GENFAST_WITH_CUDA
#include <cuda.h>
#endif

#ifndef GENFAST_CUDA_ARCHS
#define GENFAST_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list backends;
  backends.append("cpu");
#ifdef GENFAST_WITH_CUDA
  backends.append("cuda");
  info["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#else
  info["cuda_version"] = pybind11::none();
#endif
  info["backends"] = backends;
  info["cuda_archs"] = std::string(GENFAST_CUDA_ARCHS);
#ifdef GENFAST_ATTENTION_SM90
  info["attention_sm90"] = true;  // the wgmma attention kernels, opted into with GENFAST_ATTENTION_SM90=1
#else
  info["attention_sm90"] = false;
#endif
  info["cpu_amx_tiles"] = static_cast<bool>(GF_HAS_AMX_TILES);  // the compiler had AMX: avx512_amx can be taken
  info["torch_version"] = std::string(TORCH_VERSION);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "genfast native operators (registered under torch.ops.genfast) and build facts";
  m.def("build_info", &build_info, "What this build of genfast._C contains");
  m.def(
      "cpu_capability", [] { return std::string(genfast::cpu_capability_name(genfast::cpu_capability())); },
      "The instruction set the CPU kernels run with: avx512_amx, avx512_bf16, avx512, avx2 or default "
      "(GENFAST_CPU_CAPABILITY caps it)");
  m.def(
      "pages_resident",
      [](uintptr_t address, int64_t bytes) {
        return genfast::pages_resident(reinterpret_cast<const void*>(address), bytes);
      },
      "Whether the pages under [address, address + bytes) are in memory: the CPU kernels write large float32 outputs "
      "with streaming stores only then");
}
