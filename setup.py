"""Builds genfast._C: the C++ CPU kernels always, the CUDA kernels when a GPU is visible or
GENFAST_FORCE_CUDA=1.

Environment:
  GENFAST_FORCE_CUDA=1     build the CUDA kernels without a visible GPU (compile and link check)
  GENFAST_NO_CUDA=1        never build them
  TORCH_CUDA_ARCH_LIST     CUDA architectures; default: the visible GPU's, else "8.0;9.0a"
  GENFAST_ATTENTION_HEAD_DIMS  the head-dim buckets of the CUDA attention kernels to compile, e.g.
                           "64,128" (default: 32,64,128,256); 256 always is, and serves any head dim
  MAX_JOBS                 parallel compile jobs (ninja)
  GENFAST_HOST_DEBUG_INFO=1  compile the C++ sources with debug information (-g; default -g0)
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS_WITHOUT_GPU = "8.0;9.0a"


def _want_cuda():
    import torch

    if os.environ.get("GENFAST_NO_CUDA") == "1":
        return False
    if os.environ.get("GENFAST_FORCE_CUDA") == "1":
        return True
    return torch.cuda.is_available() and torch.version.cuda is not None


def _cuda_archs():
    import torch

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs = f"{major}.{minor}" + ("a" if major >= 9 else "")
        else:
            archs = DEFAULT_ARCHS_WITHOUT_GPU
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def _attention_buckets():
    """The bit mask of kernels/cuda/attention_tile.cuh's GENFAST_ATTENTION_BUCKETS."""
    wanted = os.environ.get("GENFAST_ATTENTION_HEAD_DIMS")
    if not wanted:
        return 0xF
    buckets = {32: 1, 64: 2, 128: 4, 256: 8}
    dims = [int(d) for d in wanted.replace(";", ",").split(",") if d.strip()]
    unknown = [d for d in dims if d not in buckets]
    if unknown:
        raise ValueError(f"GENFAST_ATTENTION_HEAD_DIMS takes buckets of {sorted(buckets)}, got {unknown}")
    return sum(buckets[d] for d in set(dims)) | 8


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = ["csrc/registration.cpp", "csrc/build_info.cpp", "csrc/attention_autograd.cpp",
               "csrc/inplace_versions.cpp"]
    sources += _sources("csrc/cpu/*.cpp")
    # torch picks the C++ standard its headers need; no errno from sqrt lets g++ vectorize it, and
    # no floating-point traps lets it turn selects and floor into vector code (values unchanged);
    # at::parallel_for runs in parallel only where the caller is compiled with OpenMP (it then
    # shares torch's libgomp, loaded under the same soname).
    # -g0: Python's CFLAGS bring -g, whose debug information for torch's headers triples the time a
    # source takes (GENFAST_HOST_DEBUG_INFO=1 keeps it).
    cxx = ["-O3", "-fvisibility=hidden", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    if os.environ.get("GENFAST_HOST_DEBUG_INFO") != "1":
        cxx.append("-g0")
    link = ["-fopenmp"]
    if not _want_cuda():
        return CppExtension("genfast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    archs = _cuda_archs()
    sources += _sources("csrc/cuda/*.cpp") + _sources("kernels/cuda/*.cu")
    defines = ["-DGENFAST_WITH_CUDA", f'-DGENFAST_CUDA_ARCHS="{archs}"',
               f"-DGENFAST_ATTENTION_BUCKETS={_attention_buckets()}"]
    if "9.0a" in archs.replace(" ", ";").split(";"):
        defines.append("-DGENFAST_ATTENTION_SM90")  # the wgmma attention kernels (attention_*_sm90.cu)
    nvcc = ["-O3", "-lineinfo", "-Xptxas=-v"]  # each kernel's registers and spills, in the build's log
    return CUDAExtension(
        "genfast._C", sources, extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
        extra_link_args=link,
    )


# The attention kernels take minutes to compile where the other sources take seconds (CI, 2 cores,
# "8.0;9.0a": about 186, 177, 90 and 89 s). ninja starts jobs in the order of its build file, which
# setuptools sorts by name: these last. Started first, longest first, two jobs share them evenly and
# no core waits on one of them at the end (542 s of CI's build where ~470 s could do).
SLOWEST_SOURCES = [f"kernels/cuda/attention_{name}.cu"
                   for name in ("forward_sm90", "backward", "forward", "backward_sm90")]


def _slowest_first(source):
    path = os.path.relpath(os.path.abspath(source), ROOT)
    return SLOWEST_SOURCES.index(path) if path in SLOWEST_SOURCES else len(SLOWEST_SOURCES)


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class BuildSlowestFirst(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext):
            compile_sources = self.compiler.compile  # torch's ninja compile, set by build_extensions

            def compile_slowest_first(sources, *args, **kwargs):
                return compile_sources(sorted(sources, key=_slowest_first), *args, **kwargs)  # stable

            self.compiler.compile = compile_slowest_first
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_sources

    return BuildSlowestFirst


setup(
    name="genfast",
    version="0.1.0",
    description="Fused CUDA, Triton and C++ kernels for the hot paths of generative models",
    python_requires=">=3.10",
    packages=find_packages(include=["genfast", "genfast.*"]) + ["genfast.kernels"],
    package_dir={"genfast.kernels": "kernels/triton"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _build_ext()},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "diffusers": ["diffusers"],
        "transformers": ["transformers>=5"],
        "test": ["pytest", "pytest-benchmark", "scipy", "scikit-learn", "diffusers", "transformers>=5", "psutil"],
    },
    entry_points={"console_scripts": ["genfast=genfast.cli:main"]},
    zip_safe=False,
)
