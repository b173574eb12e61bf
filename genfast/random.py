"""Keys for genfast's in-kernel Philox noise, drawn from a generator.

A call that draws n noise values in-kernel takes a (seed, offset) key and advances the generator:
- a CUDA torch.Generator gives (initial_seed(), get_offset()) and its offset advances by 4, as
  torch's own CUDA kernels advance it;
- a genfast.PhiloxGenerator does the same on any device, so one seed gives the same stream on
  CPU, CUDA and Triton;
- a CPU torch.Generator keeps no Philox offset: the key is (initial_seed(), a 62-bit draw from the
  generator times 4), reproducible after manual_seed and distinct from call to call.
"""

import torch

from .reference.random import philox_uniform

_UINT64 = (1 << 64) - 1
OFFSET_INCREMENT = 4


class PhiloxGenerator:
    """A device-independent Philox key: the same seed gives the same noise on every backend."""

    def __init__(self, seed: int = 0, offset: int = 0):
        self.manual_seed(seed)
        self._offset = int(offset)

    def manual_seed(self, seed: int):
        self._seed = int(seed) & _UINT64
        self._offset = 0
        return self

    def initial_seed(self) -> int:
        return self._seed

    def get_offset(self) -> int:
        return self._offset

    def set_offset(self, offset: int):
        self._offset = int(offset)

    def __repr__(self):
        return f"PhiloxGenerator(seed={self._seed}, offset={self._offset})"


def default_generator(device: torch.device):
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


def next_philox_key(generator, device: torch.device):
    """(seed, offset) for one call, advancing the generator. Reads no device memory."""
    if generator is None:
        generator = default_generator(device)
    if isinstance(generator, PhiloxGenerator) or generator.device.type != "cpu":
        seed, offset = generator.initial_seed(), generator.get_offset()
        generator.set_offset(offset + OFFSET_INCREMENT)
        return seed & _UINT64, offset
    draw = int(torch.randint(0, 1 << 62, (1,), generator=generator, dtype=torch.int64).item())
    return generator.initial_seed() & _UINT64, draw * OFFSET_INCREMENT


def takes_cuda_generator(generator, device: torch.device) -> bool:
    """Whether `generator` (None: the device's default) is a CUDA torch.Generator for `device`."""
    if device.type != "cuda" or isinstance(generator, PhiloxGenerator):
        return False
    return generator is None or generator.device.type == "cuda"


def cuda_graph_capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream (asked outside
    torch.compile's tracing only)."""
    return (device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_initialized()
            and torch.cuda.is_current_stream_capturing())


def check_host_key_not_captured(generator, device: torch.device) -> None:
    """A key drawn on the host would be frozen into a CUDA graph being captured: every replay would
    draw the same noise. Refused, naming what works there."""
    if cuda_graph_capturing(device):
        kind = type(generator).__name__ if generator is not None else "the default generator"
        raise RuntimeError(f"in-kernel noise under CUDA graph capture needs the native CUDA kernels and a CUDA "
                           f"torch.Generator (or None), which advance on the device; with {kind} on this backend "
                           f"every replay would draw the same noise: pass noise= instead")


def uniforms(shape, generator, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """U(0, 1) of `shape` on `device`: the Philox stream of a PhiloxGenerator (the same on every
    device), else torch's own RNG with the torch.Generator (graph-safe on CUDA with a CUDA one; a CPU
    one's drawn on the host and copied). A host-drawn key under CUDA graph capture is refused."""
    if not takes_cuda_generator(generator, device):
        check_host_key_not_captured(generator, device)
    if isinstance(generator, PhiloxGenerator):
        seed, offset = next_philox_key(generator, device)
        return philox_uniform(shape, seed, offset, dtype=dtype, device=device)
    if generator is not None and generator.device.type != device.type:
        return torch.rand(shape, generator=generator, dtype=dtype, device=generator.device).to(device,
                                                                                               non_blocking=True)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def kernel_noise_key(generator, device: torch.device, backend: str):
    """(cuda_generator, None) where the native CUDA kernel takes a CUDA torch.Generator itself,
    which keeps the noise fresh on every replay of a captured CUDA graph; else (None, (seed, offset))
    drawn here (a CPU torch.Generator's key too, with CUDA tensors)."""
    if backend == "native" and takes_cuda_generator(generator, device):
        return (generator if generator is not None else default_generator(device)), None
    check_host_key_not_captured(generator, device)
    return None, next_philox_key(generator, device)


def as_int64(value: int) -> int:
    """A 64-bit word as the signed int that an operator schema's `int` carries."""
    value &= _UINT64
    return value - (1 << 64) if value >= (1 << 63) else value
