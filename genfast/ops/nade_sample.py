"""torch.ops.genfast.nade_sample (native, from _C) and its Triton form; see csrc/registration.cpp."""

from typing import Optional

import torch

from .. import _backend
from .nade_conditionals import kernel_ordering, kernel_params

Tensor = torch.Tensor


def _fake(W, c, V, b, num_samples, dtype, uniforms, ordering, observed, num_observed, activation, *key):
    return W.new_empty(num_samples, W.shape[1], dtype=dtype)


@torch.library.custom_op("genfast::nade_sample_triton", mutates_args=())
def nade_sample_triton(W: Tensor, c: Tensor, V: Tensor, b: Tensor, num_samples: int, dtype: torch.dtype,
                       uniforms: Optional[Tensor], ordering: Optional[Tensor], observed: Optional[Tensor],
                       num_observed: int, activation: str, seed: int, offset: int) -> Tensor:
    from ..kernels.nade import launch_nade_sample

    samples = W.new_empty(num_samples, W.shape[1], dtype=dtype)
    if samples.numel() > 0:
        uniforms = None if uniforms is None else uniforms.float().contiguous()
        observed = None if num_observed == 0 else observed.to(dtype).contiguous()
        launch_nade_sample(*kernel_params(W, c, V, b), uniforms, seed, offset, *kernel_ordering(ordering),
                           activation == "relu", observed, num_observed, samples)
    return samples


nade_sample_triton.register_fake(_fake)
if _backend.native_module() is not None:
    torch.library.register_fake("genfast::nade_sample")(_fake)
