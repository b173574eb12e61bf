"""Per-sample sums of squares of the Philox noise in Triton (see kernels/common/noise_norms.h)."""

import triton
import triton.language as tl

from .common import check_grid_axis1, default_block_groups, philox_key_words, row_tile
from .philox import PHILOX_KEY_WORDS, philox_normal4

CHUNK = 1 << 14  # elements per chunk, as on the other backends


@triton.jit(do_not_specialize=PHILOX_KEY_WORDS)
def noise_norms_kernel(partial_ptr, seed_lo, seed_hi, base_lo, base_hi, num_rows, row_size, chunk_size, num_chunks,
                       BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    """Chunk program_id(1) of BLOCK_ROWS rows; the tile's groups flattened row by row ([R * G]), so
    that philox_normal4 takes one vector of groups whatever the tile."""
    lane = tl.arange(0, BLOCK_ROWS * BLOCK_GROUPS)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + (lane // BLOCK_GROUPS).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    begin = rows * row_size + chunk * chunk_size  # each row's chunk may start mid-group
    end = tl.minimum(begin + chunk_size, (rows + 1) * row_size)
    in_rows = rows < num_rows
    chunk_groups = (tl.minimum(chunk_size, row_size - chunk * chunk_size) + 3) // 4 + 1
    acc = tl.zeros([BLOCK_ROWS * BLOCK_GROUPS, 4], dtype=tl.float32)
    for start in range(0, chunk_groups, BLOCK_GROUPS):
        group = begin // 4 + start + (lane % BLOCK_GROUPS).to(tl.int64)
        idx = group[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64)
        z = philox_normal4(seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), base_lo.to(tl.uint32),
                           base_hi.to(tl.uint32), group)
        acc += tl.where((idx >= begin[:, None]) & (idx < end[:, None]) & in_rows[:, None], z * z, 0.0)
    sums = tl.sum(tl.reshape(acc, (BLOCK_ROWS, BLOCK_GROUPS * 4)), axis=1)
    first = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    tl.store(partial_ptr + first * num_chunks + chunk, sums, mask=first < num_rows)


def _tile(rows, row_size, device):
    """(BLOCK_ROWS, BLOCK_GROUPS): short rows share a program (the interpreter's cost is per program
    and step: common.default_block_groups), a long row steps a GPU's 256 groups at a time."""
    groups = triton.cdiv(min(row_size, CHUNK), 4) + 1  # + 1: a chunk may start mid-group
    lanes = default_block_groups(device, 1 << 30)
    block_rows, block_groups = row_tile(rows, groups, lanes, lanes)
    return dict(BLOCK_ROWS=block_rows, BLOCK_GROUPS=block_groups)


def gpu_variants(name, constexprs, ints):
    """The tile a GPU launch takes (genfast.testing.triton_gpu_compile)."""
    import torch

    return [(_tile(ints["num_rows"], ints["row_size"], torch.device("cuda")), None, None)]


def launch_noise_norms(partial, row_size, seed, offset, wrap=None):
    """Writes partial[r, c], the sum of z^2 over chunk c of sample r, for a (rows, chunks) float32 tensor."""
    rows, num_chunks = partial.shape
    if rows == 0 or row_size == 0:
        return
    check_grid_axis1(partial.device, "langevin_corrector_step", "a sample's element count", row_size, CHUNK)
    tile = _tile(rows, row_size, partial.device)
    kernel = noise_norms_kernel if wrap is None else wrap(noise_norms_kernel)
    kernel[(triton.cdiv(rows, tile["BLOCK_ROWS"]), num_chunks)](
        partial, *philox_key_words(seed, offset), rows, row_size, CHUNK, num_chunks, **tile)
