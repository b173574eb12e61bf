"""What every fused op's public function does around its kernel: the noise key, and the
reference backend's run."""

import torch

from .random import kernel_noise_key
from .reference.random import philox_normal


def noise_key(draws_noise: bool, noise, generator, device: torch.device, backend: str):
    """(cuda_generator, key) for an op that draws noise in-kernel (see random.kernel_noise_key);
    (None, None) when it takes `noise` or adds none."""
    if not draws_noise or noise is not None:
        return None, None
    return kernel_noise_key(generator, device, backend)


def run_reference(reference_step, like: torch.Tensor, noise, key, out, return_second: bool):
    """Runs reference_step(z) -> (result, second) with the given noise, or with the normals every
    backend draws for `key`; writes the result into out when given."""
    z = noise
    if key is not None:
        z = philox_normal(like.shape, key[0], key[1], dtype=torch.float32, device=like.device)
    result, second = reference_step(z)
    if out is not None:
        result = out.copy_(result)
    return (result, second) if return_second else result
