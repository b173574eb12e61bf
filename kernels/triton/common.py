"""Triton helpers shared by the elementwise kernels."""

import triton
import triton.language as tl

MAX_GRID_1 = 65535  # a GPU's grid stops here on its second and third axes


def check_grid_axis1(device, op: str, what: str, size: int, block: int) -> None:
    """Raises, naming the limit, where `what` (size, in blocks of `block` on grid axis 1) overflows a GPU's grid."""
    if device.type == "cuda" and triton.cdiv(size, block) > MAX_GRID_1:
        raise ValueError(f"{op}: on a GPU, {what} must be at most {MAX_GRID_1 * block}, got {size}")


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


@triton.jit
def tile_rows(BLOCK_ROWS: tl.constexpr):
    """This program's rows ([R, 1], int64): a tile of several short rows, or one row of a long one."""
    first = tl.program_id(0).to(tl.int64) * BLOCK_ROWS  # rows on axis 0: the other axes stop at 65535
    return first + tl.arange(0, BLOCK_ROWS).to(tl.int64)[:, None]


def row_tile(rows, row_size, lanes, max_block):
    """(rows, elements) per program and loop step of a kernel over rows (tile_rows): short rows share
    a program, so that a tile holds about `lanes` elements; a long row steps max_block at a time."""
    block = min(max_block, triton.next_power_of_2(max(1, row_size)))
    return max(1, min(lanes // block, triton.next_power_of_2(max(1, rows)))), block


def default_block_groups(device, numel):
    """Groups of four elements per program of the elementwise kernels, for numel elements. A GPU's
    cost is per element. The interpreter's is per program and step more than per element (2^16
    normals take 8.1 s in blocks of 64 groups, 0.55 s in blocks of 1024), but it computes every lane
    of a block, so a small tensor takes a block its size."""
    if device.type != "cpu":
        return 256
    return min(1024, triton.next_power_of_2(triton.cdiv(numel, 4)))


def group_variants(name, constexprs, ints):
    """gpu_variants (genfast.testing.triton_gpu_compile) of a kernel whose only size is BLOCK_GROUPS."""
    import torch

    return [(dict(BLOCK_GROUPS=default_block_groups(torch.device("cuda"), 0)), None, None)]


def philox_key_words(seed: int, offset: int):
    """(seed_lo, seed_hi, base_lo, base_hi): the Philox key and counter base as 32-bit words."""
    seed &= (1 << 64) - 1
    base = (offset & ((1 << 64) - 1)) // 4
    return seed & 0xFFFFFFFF, seed >> 32, base & 0xFFFFFFFF, base >> 32
