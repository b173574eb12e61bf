"""Triton helpers shared by the elementwise kernels."""

import triton
import triton.language as tl


@triton.jit
def coef(row_coefs_ptr, row, mask, scalar, j: tl.constexpr, NUM_COEFS: tl.constexpr, ROW_COEFS: tl.constexpr):
    """Coefficient j of each element's row of per-sample coefficients, or the per-call scalar."""
    if ROW_COEFS:
        return tl.load(row_coefs_ptr + row * NUM_COEFS + j, mask=mask, other=0.0)
    else:
        return scalar


@triton.jit
def clamp_keep_nan(v, lo, hi):
    """Comparisons are false for NaN, so NaN passes through."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def group_indices(BLOCK_GROUPS: tl.constexpr):
    """This program's groups of four elements ([G], int64) and their element indices ([G, 4])."""
    pid = tl.program_id(0).to(tl.int64)
    group = pid * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    return group, group[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64)


def default_block_groups(device):
    """Groups of four elements per program of the elementwise kernels: the interpreter's cost is per
    program and step, a GPU's per element."""
    return 64 if device.type == "cpu" else 256


def group_variants(name, constexprs, ints):
    """gpu_variants (genfast.testing.triton_gpu_compile) of a kernel whose only size is BLOCK_GROUPS."""
    import torch

    return [(dict(BLOCK_GROUPS=default_block_groups(torch.device("cuda"))), None, None)]


def philox_key_words(seed: int, offset: int):
    """(seed_lo, seed_hi, base_lo, base_hi): the Philox key and counter base as 32-bit words."""
    seed &= (1 << 64) - 1
    base = (offset & ((1 << 64) - 1)) // 4
    return seed & 0xFFFFFFFF, seed >> 32, base & 0xFFFFFFFF, base >> 32
