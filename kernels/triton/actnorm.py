"""ActNorm in Triton: the formulas of kernels/common/actnorm.h for x seen as (B, C, S).

The forward works on tiles of [planes, spatial elements] (a plane is one (sample, channel) pair),
so that (B, C) inputs (S = 1) fill whole tiles too. The backward gives each (chunk of samples,
channel) pair one program, which sums its shares in a fixed order: deterministic, no atomics.
"""

import triton
import triton.language as tl

from .affine_coupling import exp_f32
from .common import MAX_GRID_1


@triton.jit
def actnorm_kernel(x_ptr, log_scale_ptr, bias_ptr, y_ptr, planes, channels, inner,
                   GLOW_ORDER: tl.constexpr, INVERSE: tl.constexpr, BLOCK_PLANES: tl.constexpr,
                   BLOCK_INNER: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64) * BLOCK_PLANES + tl.arange(0, BLOCK_PLANES).to(tl.int64)
    plane_ok = plane < planes
    channel = plane % channels
    log_scale = tl.load(log_scale_ptr + channel, mask=plane_ok, other=0.0)[:, None]
    bias = tl.load(bias_ptr + channel, mask=plane_ok, other=0.0)[:, None]
    factor = exp_f32(-log_scale) if INVERSE else exp_f32(log_scale)
    # A grid-stride loop over the spatial elements: grid axis 1 stops at 65535.
    for start in range(tl.program_id(1).to(tl.int64) * BLOCK_INNER, inner, tl.num_programs(1) * BLOCK_INNER):
        s = start + tl.arange(0, BLOCK_INNER).to(tl.int64)
        offset = plane[:, None] * inner + s[None, :]
        mask = plane_ok[:, None] & (s < inner)[None, :]
        x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:
            y = x * factor - bias if GLOW_ORDER else (x - bias) * factor
        else:
            y = (x + bias) * factor if GLOW_ORDER else x * factor + bias
        tl.store(y_ptr + offset, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def actnorm_backward_kernel(grad_y_ptr, x_ptr, log_scale_ptr, bias_ptr, grad_x_ptr, partial_log_scale_ptr,
                            partial_bias_ptr, rows, channels, inner, rows_per_chunk,
                            GLOW_ORDER: tl.constexpr, INVERSE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                            BLOCK_INNER: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    chunk = program // channels
    channel = program % channels
    row_begin = chunk * rows_per_chunk
    row_end = tl.minimum(row_begin + rows_per_chunk, rows)
    log_scale = tl.load(log_scale_ptr + channel)
    bias = tl.load(bias_ptr + channel)
    factor = exp_f32(-log_scale) if INVERSE else exp_f32(log_scale)
    acc_log_scale = tl.zeros([BLOCK_ROWS, BLOCK_INNER], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_ROWS, BLOCK_INNER], dtype=tl.float32)
    for row_start in range(row_begin, row_end, BLOCK_ROWS):
        row = row_start + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        plane_start = (row * channels + channel) * inner
        for start in range(0, inner, BLOCK_INNER):
            s = start + tl.arange(0, BLOCK_INNER).to(tl.int64)
            offset = plane_start[:, None] + s[None, :]
            mask = (row < row_end)[:, None] & (s < inner)[None, :]
            g = tl.load(grad_y_ptr + offset, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
            if INVERSE:
                log_scale_share = -g * (x if GLOW_ORDER else x - bias) * factor
                bias_share = -g if GLOW_ORDER else -g * factor
            else:
                log_scale_share = g * (x + bias if GLOW_ORDER else x) * factor
                bias_share = g * factor if GLOW_ORDER else g
            tl.store(grad_x_ptr + offset, (g * factor).to(grad_x_ptr.dtype.element_ty), mask=mask)
            acc_log_scale += tl.where(mask, log_scale_share, 0.0)
            acc_bias += tl.where(mask, bias_share, 0.0)
    tl.store(partial_log_scale_ptr + program, tl.sum(acc_log_scale))
    tl.store(partial_bias_ptr + program, tl.sum(acc_bias))


def _tile(inner, device):
    """(planes or rows, spatial elements) of a tile: whole rows of short spatial sizes. The
    interpreter's cost is per program and step (common.default_block_groups): larger tiles there."""
    size = 4096 if device.type == "cpu" else 1024
    block_inner = min(size, triton.next_power_of_2(inner))
    return size // block_inner, block_inner


def _backward_tile(inner, rows_per_chunk, device):
    """(rows, spatial elements) of a backward tile: a chunk's rows at most."""
    block_rows, block_inner = _tile(inner, device)
    return min(block_rows, triton.next_power_of_2(rows_per_chunk)), block_inner


def gpu_variants(name, constexprs, ints):
    """The tile a GPU launch takes (genfast.testing.triton_gpu_compile)."""
    import torch

    cuda = torch.device("cuda")
    if name == "actnorm_kernel":
        block_planes, block_inner = _tile(ints["inner"], cuda)
        return [(dict(BLOCK_PLANES=block_planes, BLOCK_INNER=block_inner), None, None)]
    block_rows, block_inner = _backward_tile(ints["inner"], ints["rows_per_chunk"], cuda)
    return [(dict(BLOCK_ROWS=block_rows, BLOCK_INNER=block_inner), None, None)]


def launch_actnorm(x, log_scale, bias, y, glow_order: bool, inverse: bool):
    """y from x, both (B, C, S) contiguous; log_scale and bias (C,) float32."""
    rows, channels, inner = x.shape
    if x.numel() == 0:
        return
    block_planes, block_inner = _tile(inner, x.device)
    planes = rows * channels
    grid = (triton.cdiv(planes, block_planes), min(triton.cdiv(inner, block_inner), MAX_GRID_1))
    actnorm_kernel[grid](x, log_scale, bias, y, planes, channels, inner, GLOW_ORDER=bool(glow_order),
                         INVERSE=bool(inverse), BLOCK_PLANES=block_planes, BLOCK_INNER=block_inner)


def launch_actnorm_backward(grad_y, x, log_scale, bias, grad_x, partial_log_scale, partial_bias, rows_per_chunk: int,
                            glow_order: bool, inverse: bool):
    """grad_x, and partial_*[k, c]: channel c's shares of the log_scale and bias gradients summed over
    samples [k * rows_per_chunk, (k + 1) * rows_per_chunk), for (num_chunks, C) float32 partial_*."""
    rows, channels, inner = x.shape
    if x.numel() == 0:
        return
    block_rows, block_inner = _backward_tile(inner, rows_per_chunk, x.device)
    num_chunks = triton.cdiv(rows, rows_per_chunk)
    actnorm_backward_kernel[(num_chunks * channels,)](
        grad_y, x, log_scale, bias, grad_x, partial_log_scale, partial_bias, rows, channels, inner, rows_per_chunk,
        GLOW_ORDER=bool(glow_order), INVERSE=bool(inverse), BLOCK_ROWS=block_rows, BLOCK_INNER=block_inner)
