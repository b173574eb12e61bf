"""torch.ops.genfast.langevin_step (native, from _C) and its Triton operators.

Same arguments (see csrc/registration.cpp and kernels/common/langevin_step.h), except that the
native one also takes a CUDA generator. langevin_step_triton is a triton_op (GPU);
langevin_step_triton_interpreted an opaque custom_op for the CPU interpreter.
"""

from typing import List, Optional

import torch

from .. import _backend
from ._buffers import contiguous_inputs, copy_back, output_buffers

def _langevin_step_fake(x, grad, noise, row_coefs, coefs, grad_clip, clamp_lo, clamp_hi, philox_noise, seed, offset,
                        out, mean_out):
    return None


def _native_langevin_step_fake(x, grad, noise, row_coefs, coefs, grad_clip, clamp_lo, clamp_hi, philox_noise,
                               generator, seed, offset, out, mean_out):
    return None


if _backend.native_module() is not None:
    torch.library.register_fake("genfast::langevin_step")(_native_langevin_step_fake)


def _launch_triton(x, grad, noise, row_coefs, coefs, grad_clip, clamp_lo, clamp_hi, philox_noise, seed, offset, out,
                   mean_out, wrap=None):
    from ..kernels.langevin_step import launch_langevin_step

    inputs = contiguous_inputs(x, grad, noise, row_coefs)
    buffers = output_buffers(out, mean_out)
    launch_langevin_step(*inputs, coefs, grad_clip, clamp_lo, clamp_hi, philox_noise, seed, offset, *buffers,
                         wrap=wrap)
    copy_back(buffers, (out, mean_out))


@torch.library.triton_op("genfast::langevin_step_triton", mutates_args=("out", "mean_out"))
def langevin_step_triton(
    x: torch.Tensor, grad: torch.Tensor, noise: Optional[torch.Tensor], row_coefs: Optional[torch.Tensor],
    coefs: List[float], grad_clip: float, clamp_lo: float, clamp_hi: float, philox_noise: bool, seed: int,
    offset: int, out: torch.Tensor, mean_out: Optional[torch.Tensor],
) -> None:
    _launch_triton(x, grad, noise, row_coefs, coefs, grad_clip, clamp_lo, clamp_hi, philox_noise, seed, offset, out,
                   mean_out, wrap=torch.library.wrap_triton)


@torch.library.custom_op("genfast::langevin_step_triton_interpreted", mutates_args=("out", "mean_out"))
def langevin_step_triton_interpreted(
    x: torch.Tensor, grad: torch.Tensor, noise: Optional[torch.Tensor], row_coefs: Optional[torch.Tensor],
    coefs: List[float], grad_clip: float, clamp_lo: float, clamp_hi: float, philox_noise: bool, seed: int,
    offset: int, out: torch.Tensor, mean_out: Optional[torch.Tensor],
) -> None:
    _launch_triton(x, grad, noise, row_coefs, coefs, grad_clip, clamp_lo, clamp_hi, philox_noise, seed, offset, out,
                   mean_out)


langevin_step_triton_interpreted.register_fake(_langevin_step_fake)


def triton_operator(device_type: str):
    if device_type == "cpu":
        return torch.ops.genfast.langevin_step_triton_interpreted
    return torch.ops.genfast.langevin_step_triton


def run(impl: str, x, grad, noise, row_coefs, coefs, grad_clip, clamp_lo, clamp_hi, philox_noise, generator, seed,
        offset, out, mean_out) -> None:
    """Launches the resolved backend ("native" or "triton"); see denoise_step.run for `generator`."""
    args = (x, grad, noise, row_coefs, coefs, grad_clip, clamp_lo, clamp_hi, philox_noise)
    if impl == "native":
        torch.ops.genfast.langevin_step(*args, generator, seed, offset, out, mean_out)
    elif impl == "triton":
        if generator is not None:
            raise ValueError("the Triton Langevin step is keyed by seed and offset, not by a generator")
        triton_operator(x.device.type)(*args, seed, offset, out, mean_out)
    else:
        raise ValueError(f"langevin_step has no operator for impl={impl!r}")
