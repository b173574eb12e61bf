"""torch.ops.genfast.denoise_step (native, from _C) and torch.ops.genfast.denoise_step_triton.

Both take the same arguments: see csrc/registration.cpp and kernels/common/denoise_step.h.
The Triton operator is a torch.library.custom_op with an explicit fake, which passes opcheck and
torch.compile(fullgraph=True) under TRITON_INTERPRET=1 as well as on a GPU.
"""

from typing import List, Optional

import torch

from .. import _backend

NUM_COEFS = 9


def _denoise_step_fake(sample, model_output, model_output_cond, derivative, noise, row_coefs, coefs, clip, clip_lo,
                       clip_hi, philox_noise, seed, offset, out, pred_original):
    return None


def _native_denoise_step_fake(sample, model_output, model_output_cond, derivative, noise, row_coefs, coefs, clip,
                              clip_lo, clip_hi, philox_noise, generator, seed, offset, out, pred_original):
    return None


if _backend.native_module() is not None:
    torch.library.register_fake("genfast::denoise_step")(_native_denoise_step_fake)


@torch.library.custom_op("genfast::denoise_step_triton", mutates_args=("out", "pred_original"))
def denoise_step_triton(
    sample: torch.Tensor, model_output: torch.Tensor, model_output_cond: Optional[torch.Tensor],
    derivative: Optional[torch.Tensor], noise: Optional[torch.Tensor], row_coefs: Optional[torch.Tensor],
    coefs: List[float], clip: bool, clip_lo: float, clip_hi: float, philox_noise: bool, seed: int, offset: int,
    out: torch.Tensor, pred_original: Optional[torch.Tensor],
) -> None:
    from ..kernels.denoise_step import launch_denoise_step

    contiguous = [t.contiguous() if t is not None else None
                  for t in (sample, model_output, model_output_cond, derivative, noise, row_coefs)]
    out_buffer = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    pred_buffer = pred_original
    if pred_original is not None and not pred_original.is_contiguous():
        pred_buffer = torch.empty_like(pred_original, memory_format=torch.contiguous_format)
    launch_denoise_step(*contiguous, coefs, clip, clip_lo, clip_hi, philox_noise, seed, offset, out_buffer, pred_buffer)
    if out_buffer is not out:
        out.copy_(out_buffer)
    if pred_buffer is not pred_original:
        pred_original.copy_(pred_buffer)


denoise_step_triton.register_fake(_denoise_step_fake)


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
        torch.ops.genfast.denoise_step_triton(*args, seed, offset, out, pred_original)
    else:
        raise ValueError(f"denoise_step has no operator for impl={impl!r}")
