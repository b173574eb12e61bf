"""Philox-4x32-10 and Box-Muller in plain PyTorch: the definition of genfast's in-kernel noise.

Element i of a call keyed by (seed, offset) is output i % 4 of Philox evaluated at the counter
(offset // 4, i // 4) with key seed, each counter half split into two 32-bit words; Box-Muller
turns outputs (0, 1) and (2, 3) into two pairs of normals. Integer maths runs in int64 with
32-bit words, so it is exact on every device.
"""

import math

import torch

_MASK32 = 0xFFFFFFFF
_MUL0, _MUL1 = 0xD2511F53, 0xCD9E8D57
_WEYL0, _WEYL1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) words of the 64-bit product of the constant a and the 32-bit words b."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low_part = a * b_lo  # < 2^48
    high_part = a * b_hi  # < 2^48, to be shifted left by 16
    lo_sum = low_part + ((high_part & 0xFFFF) << 16)
    lo = lo_sum & _MASK32
    hi = ((high_part >> 16) + (lo_sum >> 32)) & _MASK32
    return hi, lo


def philox4x32_10(counter, key):
    """Philox-4x32-10 on int64 tensors of 32-bit words; counter is 4 tensors, key 2 ints."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_MUL0, c0)
        hi1, lo1 = _mulhilo32(_MUL1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL0) & _MASK32, (k1 + _WEYL1) & _MASK32
    return c0, c1, c2, c3


def philox_bits(num_groups: int, seed: int, offset: int, device=None):
    """The four 32-bit Philox words of each group of four elements, as int64 tensors."""
    seed &= (1 << 64) - 1
    base = (offset & ((1 << 64) - 1)) // 4
    group = torch.arange(num_groups, dtype=torch.int64, device=device)
    counter = (
        torch.full_like(group, base & _MASK32),
        torch.full_like(group, base >> 32),
        group & _MASK32,
        group >> 32,
    )
    return philox4x32_10(counter, (seed & _MASK32, seed >> 32))


def _uniform_open_zero(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 8).to(torch.float64) + 0.5) * 2.0**-24


def _turns(bits: torch.Tensor) -> torch.Tensor:
    return (bits >> 8).to(torch.float64) * (2.0 * math.pi * 2.0**-24)


def philox_normal(shape, seed: int, offset: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normals of the given shape, the stream every genfast backend draws for (seed, offset)."""
    shape = torch.Size(shape)
    numel = shape.numel()
    x, y, z, w = philox_bits((numel + 3) // 4, seed, offset, device)
    r0 = torch.sqrt(-2.0 * torch.log(_uniform_open_zero(x)))
    r1 = torch.sqrt(-2.0 * torch.log(_uniform_open_zero(z)))
    a0, a1 = _turns(y), _turns(w)
    normals = torch.stack([r0 * torch.cos(a0), r0 * torch.sin(a0), r1 * torch.cos(a1), r1 * torch.sin(a1)], dim=1)
    return normals.reshape(-1)[:numel].reshape(shape).to(dtype)


def philox_uniform(shape, seed: int, offset: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Uniforms in (0, 1) of the given shape: element i is ((w >> 8) + 0.5) / 2^24 for word i % 4 of
    group i // 4, the stream genfast's random draws (NADE's sampling) read for (seed, offset). Exact
    in float32."""
    shape = torch.Size(shape)
    numel = shape.numel()
    words = torch.stack(philox_bits((numel + 3) // 4, seed, offset, device), dim=1).reshape(-1)[:numel]
    return _uniform_open_zero(words).reshape(shape).to(dtype)
