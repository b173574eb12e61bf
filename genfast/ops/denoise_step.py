"""torch.ops.genfast.denoise_step (native, from _C) and its Triton operators.

They take the same arguments (see csrc/registration.cpp and kernels/common/denoise_step.h), except
that the native one also takes a CUDA generator. Triton: denoise_step_triton is a triton_op (GPU);
denoise_step_triton_interpreted an opaque custom_op for the CPU interpreter.
"""

from typing import List, Optional

import torch

from .. import _backend
from ._buffers import contiguous_inputs, copy_back, output_buffers

def _denoise_step_fake(sample, model_output, model_output_cond, derivative, noise, row_coefs, coefs, clip, clip_lo,
                       clip_hi, philox_noise, seed, offset, out, pred_original):
    return None


def _native_denoise_step_fake(sample, model_output, model_output_cond, derivative, noise, row_coefs, coefs, clip,
                              clip_lo, clip_hi, philox_noise, generator, seed, offset, out, pred_original):
    return None


if _backend.native_module() is not None:
    torch.library.register_fake("genfast::denoise_step")(_native_denoise_step_fake)


def _launch_triton(sample, model_output, model_output_cond, derivative, noise, row_coefs, coefs, clip, clip_lo,
                   clip_hi, philox_noise, seed, offset, out, pred_original, wrap=None):
    from ..kernels.denoise_step import launch_denoise_step

    inputs = contiguous_inputs(sample, model_output, model_output_cond, derivative, noise, row_coefs)
    buffers = output_buffers(out, pred_original)
    launch_denoise_step(*inputs, coefs, clip, clip_lo, clip_hi, philox_noise, seed, offset, *buffers, wrap=wrap)
    copy_back(buffers, (out, pred_original))


# On a GPU: a triton_op, which torch.compile traces into.
@torch.library.triton_op("genfast::denoise_step_triton", mutates_args=("out", "pred_original"))
def denoise_step_triton(
    sample: torch.Tensor, model_output: torch.Tensor, model_output_cond: Optional[torch.Tensor],
    derivative: Optional[torch.Tensor], noise: Optional[torch.Tensor], row_coefs: Optional[torch.Tensor],
    coefs: List[float], clip: bool, clip_lo: float, clip_hi: float, philox_noise: bool, seed: int, offset: int,
    out: torch.Tensor, pred_original: Optional[torch.Tensor],
) -> None:
    _launch_triton(sample, model_output, model_output_cond, derivative, noise, row_coefs, coefs, clip, clip_lo,
                   clip_hi, philox_noise, seed, offset, out, pred_original, wrap=torch.library.wrap_triton)


# Under TRITON_INTERPRET=1 on the CPU: the same kernel behind an opaque custom_op with an explicit
# fake, since a triton_op's self-traced fake reads tensor data there and fails opcheck and compile.
@torch.library.custom_op("genfast::denoise_step_triton_interpreted", mutates_args=("out", "pred_original"))
def denoise_step_triton_interpreted(
    sample: torch.Tensor, model_output: torch.Tensor, model_output_cond: Optional[torch.Tensor],
    derivative: Optional[torch.Tensor], noise: Optional[torch.Tensor], row_coefs: Optional[torch.Tensor],
    coefs: List[float], clip: bool, clip_lo: float, clip_hi: float, philox_noise: bool, seed: int, offset: int,
    out: torch.Tensor, pred_original: Optional[torch.Tensor],
) -> None:
    _launch_triton(sample, model_output, model_output_cond, derivative, noise, row_coefs, coefs, clip, clip_lo,
                   clip_hi, philox_noise, seed, offset, out, pred_original)


denoise_step_triton_interpreted.register_fake(_denoise_step_fake)


def triton_operator(device_type: str):
    """The Triton operator for tensors on `device_type`."""
    if device_type == "cpu":
        return torch.ops.genfast.denoise_step_triton_interpreted
    return torch.ops.genfast.denoise_step_triton


def run(impl: str, sample, model_output, model_output_cond, derivative, noise, row_coefs, coefs, clip, clip_lo,
        clip_hi, philox_noise, generator, seed, offset, out, pred_original) -> None:
    """Launches the resolved backend ("native" or "triton"). `generator`, a CUDA torch.Generator or
    None, keys the noise in the native CUDA kernel (graph-safe); else (seed, offset) do."""
    args = (sample, model_output, model_output_cond, derivative, noise, row_coefs, coefs, clip, clip_lo, clip_hi,
            philox_noise)
    if impl == "native":
        torch.ops.genfast.denoise_step(*args, generator, seed, offset, out, pred_original)
    elif impl == "triton":
        if generator is not None:
            raise ValueError("the Triton denoise step is keyed by seed and offset, not by a generator")
        triton_operator(sample.device.type)(*args, seed, offset, out, pred_original)
    else:
        raise ValueError(f"denoise_step has no operator for impl={impl!r}")
