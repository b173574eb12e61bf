"""MALA's accept/reject in Triton: the two passes of kernels/common/mala.h."""

import triton
import triton.language as tl

from .common import check_grid_axis1, row_tile, tile_rows

CHUNK = 1 << 14  # elements per chunk of pass 1, as on the other backends


@triton.jit
def mala_sums_kernel(x_ptr, y_ptr, gx_ptr, gy_ptr, step_ptr, partial_ptr, num_rows, row_size, chunk_size,
                     num_chunks, STEP_PER_ROW: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tile_rows(BLOCK_ROWS)
    chunk = tl.program_id(1).to(tl.int64)
    begin = chunk * chunk_size
    end = tl.minimum(begin + chunk_size, row_size)
    if STEP_PER_ROW:
        eps = tl.load(step_ptr + rows, mask=rows < num_rows, other=0.0)
    else:
        eps = tl.load(step_ptr)
    acc = tl.zeros([BLOCK_ROWS, BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        n = start + tl.arange(0, BLOCK).to(tl.int64)[None, :]
        mask = (rows < num_rows) & (n < end)
        idx = rows * row_size + n
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        gx = tl.load(gx_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(mask, (gx + gy) * (2.0 * (y - x) + eps * (gy - gx)), 0.0)
    tl.store(partial_ptr + rows * num_chunks + chunk, tl.sum(acc, axis=1)[:, None], mask=rows < num_rows)


@triton.jit
def mala_select_kernel(accepted_ptr, x_ptr, y_ptr, gx_ptr, gy_ptr, x_out_ptr, g_out_ptr, numel, row_size,
                       BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    accept = tl.load(accepted_ptr + idx // row_size, mask=mask, other=0) != 0
    x = tl.load(x_ptr + idx, mask=mask & ~accept)
    y = tl.load(y_ptr + idx, mask=mask & accept)
    gx = tl.load(gx_ptr + idx, mask=mask & ~accept)
    gy = tl.load(gy_ptr + idx, mask=mask & accept)
    tl.store(x_out_ptr + idx, tl.where(accept, y, x), mask=mask)
    tl.store(g_out_ptr + idx, tl.where(accept, gy, gx), mask=mask)


def _sums_tile(rows, row_size, device):
    """(BLOCK_ROWS, BLOCK) of pass 1. The interpreter's cost is per program and step, with every lane
    computed (common.default_block_groups): 512 rows of one element took 512 programs a call."""
    lanes = 4096 if device.type == "cpu" else 1024
    block_rows, block = row_tile(rows, min(row_size, CHUNK), lanes, lanes)
    return dict(BLOCK_ROWS=block_rows, BLOCK=block)


def gpu_variants(name, constexprs, ints):
    """The tile a GPU launch of mala_sums_kernel takes (genfast.testing.triton_gpu_compile)."""
    import torch

    if name != "mala_sums_kernel":
        return None
    return [(_sums_tile(ints["num_rows"], ints["row_size"], torch.device("cuda")), None, None)]


def launch_mala_sums(x, y, grad_x, grad_y, step_size, partial):
    """Partial sums of pass 1 into partial, (rows, chunks) float32, for contiguous inputs."""
    rows, num_chunks = partial.shape
    row_size = x.numel() // rows
    check_grid_axis1(x.device, "mala_accept", "a sample's element count", row_size, CHUNK)
    tile = _sums_tile(rows, row_size, x.device)
    mala_sums_kernel[(triton.cdiv(rows, tile["BLOCK_ROWS"]), num_chunks)](
        x, y, grad_x, grad_y, step_size, partial, rows, row_size, CHUNK, num_chunks,
        STEP_PER_ROW=step_size.numel() > 1, **tile)


def launch_mala_select(accepted, x, y, grad_x, grad_y, x_out, grad_out):
    """Pass 2 for contiguous tensors: each element reads only the source its row keeps."""
    numel = x.numel()
    if numel == 0:
        return
    block = 1024
    mala_select_kernel[(triton.cdiv(numel, block),)](accepted, x, y, grad_x, grad_y, x_out, grad_out, numel,
                                                     numel // accepted.numel(), BLOCK=block)
