"""Finds what this installation can run: the native extension, Triton, the devices; resolves impl."""

import functools
import importlib
import os
import warnings

import torch

IMPLS = ("auto", "native", "triton", "reference")

_native = None
_native_error = None
try:
    from . import _C as _native  # noqa: F401  (loading it registers torch.ops.genfast.*)
except ImportError as error:  # not built: Triton or the reference take over
    _native_error = str(error)


def native_module():
    return _native


def native_error():
    return _native_error


def warn_if_native_missing():
    if _native is None and os.environ.get("GENFAST_QUIET") != "1":
        warnings.warn(
            f"genfast: the native extension genfast._C is not built ({_native_error}); "
            "using Triton or the PyTorch reference instead. Build it with "
            "`pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=3,
        )


_NATIVE_BACKENDS = tuple(_native.build_info()["backends"]) if _native is not None else ()


def native_backends() -> tuple:
    return _NATIVE_BACKENDS


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _major_minor(version: str) -> tuple:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def interpreter_error(triton_version: str, numpy_version: str):
    """None when Triton's interpreter of this version runs genfast's kernels with this numpy, else why
    not: before Triton 3.7 it takes a loop bound's value with int() of a one-element array, which
    numpy 2.4 refuses (triton-lang/triton#9171), so every kernel with a loop fails."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) fails with numpy {numpy_version} "
                "(triton-lang/triton#9171, fixed in Triton 3.7): install numpy<2.4 or triton>=3.7")
    return None


@functools.lru_cache(maxsize=None)
def triton_error():
    """None when Triton kernels can be imported (and, under TRITON_INTERPRET=1, interpreted), else why not."""
    try:
        importlib.import_module("genfast.kernels.denoise_step")
    except Exception as error:  # triton missing, or broken for this platform
        return f"{type(error).__name__}: {error}"
    if triton_interpreted():
        import numpy
        import triton

        return interpreter_error(triton.__version__, numpy.__version__)
    return None


def triton_runs_on(device_type: str) -> bool:
    if triton_error() is not None:
        return False
    if device_type == "cuda":
        return not triton_interpreted()
    return device_type == "cpu" and triton_interpreted()


def native_runs_on(device_type: str) -> bool:
    return device_type in native_backends()


def available_impls(device_type: str) -> list:
    impls = []
    if native_runs_on(device_type):
        impls.append("native")
    if triton_runs_on(device_type):
        impls.append("triton")
    impls.append("reference")
    return impls


# A constant for torch.compile: the choice depends only on the installation, never on tensor data.
@torch.compiler.assume_constant_result
def resolve_impl(impl: str, device: torch.device) -> str:
    """The backend that runs: `auto` takes native, then Triton (on a GPU), then the reference."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kind = device.type
    if impl == "auto":
        if native_runs_on(kind):
            return "native"
        if kind == "cuda" and triton_runs_on(kind):
            return "triton"
        return "reference"
    if impl == "native" and not native_runs_on(kind):
        why = _native_error if _native is None else f"it was built for {list(native_backends())} only"
        raise RuntimeError(f"impl='native' cannot run on {kind}: {why}")
    if impl == "triton" and not triton_runs_on(kind):
        why = triton_error() or (
            "Triton runs CPU tensors only under TRITON_INTERPRET=1" if kind == "cpu" else f"no Triton backend for {kind}"
        )
        raise RuntimeError(f"impl='triton' cannot run on {kind}: {why}")
    return impl
