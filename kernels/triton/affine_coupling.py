"""The affine coupling transform of a normalizing flow in Triton: the formulas of
kernels/common/affine_coupling.h.

exp, log, log1p, tanh and atan are the Cephes polynomials of kernels/common/elementary_math.h,
the same on every backend: libdevice does not run under the interpreter, tl.exp becomes the
approximate ex2.approx on NVIDIA GPUs, and tl.log flushes denormals there. The scale function and
the flags are constexpr, so each compiled variant is branch-free.
"""

import triton
import triton.language as tl

from .common import check_grid_axis1, row_tile, tile_rows
from .philox import log_positive

CHUNK = 1 << 14  # elements of a row per partial logdet sum, as on the other backends

# Scale function codes: the order of reference.flows.SCALE_FNS.
EXP, SIGMOID, SOFTPLUS, TANH, ATAN, SOFT_BOUND = (tl.constexpr(code) for code in range(6))
ATAN_FACTOR = tl.constexpr(0.636)


@triton.jit
def exp_f32(x):
    n = tl.floor(x * 1.44269504088896341 + 0.5)
    r = x - n * 0.693359375
    r = r + n * 2.12194440e-4
    p = 1.9875691500e-4
    p = p * r + 1.3981999507e-3
    p = p * r + 8.3334519073e-3
    p = p * r + 4.1665795894e-2
    p = p * r + 1.6666665459e-1
    p = p * r + 5.0000001201e-1
    e = p * (r * r) + r + 1.0
    # 2^n in two factors, so that results down to the denormals come out right.
    n = tl.where(x < -127.0, -150.0, tl.where(x > 128.0, 129.0, n))
    k = tl.where(n == n, n, 0.0).to(tl.int32)
    k1 = k >> 1
    k2 = k - k1
    scaled = e * ((k1 + 127) << 23).to(tl.float32, bitcast=True) * ((k2 + 127) << 23).to(tl.float32, bitcast=True)
    result = tl.where(x > 88.72283905206835, float("inf"), tl.where(x < -103.97208, 0.0, scaled))
    return tl.where(x != x, x, result)


@triton.jit
def log_f32(v):
    denormal = v < 1.17549435e-38
    normal = tl.where(denormal, v * 8388608.0, v)  # 2^23
    r = log_positive(normal) - tl.where(denormal, 15.942385152878742, 0.0)  # 23 log 2
    r = tl.where(v == 0.0, -float("inf"), r)
    r = tl.where(v < 0.0, float("nan"), r)
    r = tl.where(v == float("inf"), v, r)
    return tl.where(v != v, v, r)


@triton.jit
def log1p_f32(z):
    """log(1 + z) for z >= -1, accurate for tiny z (Goldberg's correction of the rounding in 1 + z)."""
    w = 1.0 + z
    corrected = log_f32(w) * (z / (w - 1.0))
    r = tl.where(w == 1.0, z, corrected)
    return tl.where(w == float("inf"), w, r)


@triton.jit
def tanh_f32(x):
    a = tl.abs(x)
    z = x * x
    p = -5.70498872745e-3
    p = p * z + 2.06390887954e-2
    p = p * z - 5.37397155531e-2
    p = p * z + 1.33314422036e-1
    p = p * z - 3.33332819422e-1
    small = p * z * x + x
    large = 1.0 - 2.0 / (exp_f32(a + a) + 1.0)
    return tl.where(a >= 0.625, tl.where(x < 0.0, -large, large), small)


@triton.jit
def atan_f32(x):
    a = tl.abs(x)
    big = a > 2.414213562373095
    mid = a > 0.4142135623730950
    r = tl.where(big, -1.0 / a, tl.where(mid, (a - 1.0) / (a + 1.0), a))
    base = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    z = r * r
    p = 8.05374449538e-2
    p = p * z - 1.38776856032e-1
    p = p * z + 1.99777106478e-1
    p = p * z - 3.33329491539e-1
    y = base + (p * z * r + r)
    return tl.where(x < 0.0, -y, tl.where(x != x, x, y))


@triton.jit
def sigmoid_f32(x):
    return 1.0 / (1.0 + exp_f32(-x))


@triton.jit
def softplus_f32(x):
    """log(1 + e^x) without overflow; NaN in, NaN out (tl.maximum may drop NaN)."""
    return tl.where(x > 0.0, x, 0.0) + log1p_f32(exp_f32(-tl.abs(x)))


@triton.jit
def scale_terms(u, p, SCALE_FN: tl.constexpr):
    """(log s, s, 1 / s, d log s / du) for the unconstrained scale u; p is the function's parameter."""
    if SCALE_FN == SIGMOID:
        sg = sigmoid_f32(u + 2.0)
        scale = sg + p
        # With p = 0, log sigmoid(v) = -softplus(-v) stays finite where sigmoid underflows.
        log_scale = tl.where(p > 0.0, log_f32(scale), -softplus_f32(-(u + 2.0)))
        inv_scale = 1.0 / scale
        dlog = tl.where(p > 0.0, sg * (1.0 - sg) / scale, 1.0 - sg)
    elif SCALE_FN == SOFTPLUS:
        scale = softplus_f32(u) + p
        log_scale = log_f32(scale)
        inv_scale = 1.0 / scale
        dlog = sigmoid_f32(u) / scale
    else:
        if SCALE_FN == TANH:
            th = tanh_f32(u / p)
            log_scale = p * th
            dlog = 1.0 - th * th
        elif SCALE_FN == ATAN:
            v = u / p
            log_scale = p * ATAN_FACTOR * atan_f32(v)
            dlog = ATAN_FACTOR / (1.0 + v * v)
        elif SCALE_FN == SOFT_BOUND:
            d = 1.0 + tl.abs(u) / p
            log_scale = u / d
            dlog = 1.0 / (d * d)
        else:  # EXP
            log_scale = u
            dlog = tl.full(u.shape, 1.0, tl.float32)
        scale = exp_f32(log_scale)
        inv_scale = exp_f32(-log_scale)
    return log_scale, scale, inv_scale, dlog


@triton.jit
def load_transformed(x_ptr, shift_ptr, scale_ptr, index_ptr, rows, n, num_rows, end, x_stride, shift_stride,
                     scale_stride, FULL: tl.constexpr):
    """For a tile of rows [R, 1] and elements n [1, N]: (in the tile, transformed, column in
    shift/scale, x, t, u)."""
    in_tile = (rows < num_rows) & (n < end)
    column = tl.load(index_ptr + n, mask=n < end, other=-1).to(tl.int64)
    transformed = in_tile & (column >= 0)
    if FULL:
        column = n  # the same column, known to be contiguous
    x = tl.load(x_ptr + rows * x_stride + n, mask=in_tile, other=0.0).to(tl.float32)
    t = tl.load(shift_ptr + rows * shift_stride + column, mask=transformed, other=0.0).to(tl.float32)
    u = tl.load(scale_ptr + rows * scale_stride + column, mask=transformed, other=0.0).to(tl.float32)
    return in_tile, transformed, column, x, t, u


@triton.jit
def affine_coupling_kernel(x_ptr, shift_ptr, scale_ptr, index_ptr, y_ptr, partial_ptr, scale_param, num_rows,
                           row_size, x_stride, shift_stride, scale_stride, chunk_size, num_chunks,
                           SCALE_FN: tl.constexpr, GLOW_ORDER: tl.constexpr, INVERSE: tl.constexpr,
                           FULL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tile_rows(BLOCK_ROWS)
    chunk = tl.program_id(1).to(tl.int64)
    begin = chunk * chunk_size
    end = tl.minimum(begin + chunk_size, row_size)
    acc = tl.zeros([BLOCK_ROWS, BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        n = start + tl.arange(0, BLOCK).to(tl.int64)[None, :]
        in_tile, transformed, column, x, t, u = load_transformed(
            x_ptr, shift_ptr, scale_ptr, index_ptr, rows, n, num_rows, end, x_stride, shift_stride, scale_stride,
            FULL)
        log_scale, scale, inv_scale, _ = scale_terms(u, scale_param, SCALE_FN)
        if INVERSE:
            y = x * inv_scale - t if GLOW_ORDER else (x - t) * inv_scale
        else:
            y = (x + t) * scale if GLOW_ORDER else x * scale + t
        y = tl.where(transformed, y, x)
        tl.store(y_ptr + rows * row_size + n, y.to(y_ptr.dtype.element_ty), mask=in_tile)
        acc += tl.where(transformed, log_scale, 0.0)
    logdet = tl.sum(acc, axis=1)[:, None]
    if INVERSE:
        logdet = -logdet
    tl.store(partial_ptr + rows * num_chunks + chunk, logdet, mask=rows < num_rows)


@triton.jit
def affine_coupling_backward_kernel(grad_y_ptr, grad_logdet_ptr, x_ptr, shift_ptr, scale_ptr, index_ptr, grad_x_ptr,
                                    grad_shift_ptr, grad_scale_ptr, scale_param, num_rows, row_size,
                                    transformed_size, grad_y_stride, x_stride, shift_stride, scale_stride,
                                    chunk_size, SCALE_FN: tl.constexpr, GLOW_ORDER: tl.constexpr,
                                    INVERSE: tl.constexpr, FULL: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                                    BLOCK: tl.constexpr):
    rows = tile_rows(BLOCK_ROWS)
    chunk = tl.program_id(1).to(tl.int64)
    begin = chunk * chunk_size
    end = tl.minimum(begin + chunk_size, row_size)
    g_logdet = tl.load(grad_logdet_ptr + rows, mask=rows < num_rows, other=0.0)
    for start in range(begin, end, BLOCK):
        n = start + tl.arange(0, BLOCK).to(tl.int64)[None, :]
        in_tile, transformed, column, x, t, u = load_transformed(
            x_ptr, shift_ptr, scale_ptr, index_ptr, rows, n, num_rows, end, x_stride, shift_stride, scale_stride,
            FULL)
        g = tl.load(grad_y_ptr + rows * grad_y_stride + n, mask=in_tile, other=0.0).to(tl.float32)
        log_scale, scale, inv_scale, dlog = scale_terms(u, scale_param, SCALE_FN)
        if INVERSE:
            grad_x = g * inv_scale
            grad_shift = -g if GLOW_ORDER else -g * inv_scale
            x_part = x * inv_scale if GLOW_ORDER else (x - t) * inv_scale
            grad_scale = -(g * x_part + g_logdet) * dlog
        else:
            grad_x = g * scale
            grad_shift = g * scale if GLOW_ORDER else g
            x_part = x + t if GLOW_ORDER else x
            grad_scale = (g * x_part * scale + g_logdet) * dlog
        grad_x = tl.where(transformed, grad_x, g)
        tl.store(grad_x_ptr + rows * row_size + n, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_tile)
        if FULL:  # every entry is written: 0 at identity elements
            grad_shift = tl.where(transformed, grad_shift, 0.0)
            grad_scale = tl.where(transformed, grad_scale, 0.0)
            written = in_tile
        else:
            written = transformed
        param_offset = rows * transformed_size + column
        tl.store(grad_shift_ptr + param_offset, grad_shift.to(grad_shift_ptr.dtype.element_ty), mask=written)
        tl.store(grad_scale_ptr + param_offset, grad_scale.to(grad_scale_ptr.dtype.element_ty), mask=written)


def _tile(rows, row_size, device):
    """Larger tiles under the interpreter, whose cost is per program and step (common.default_block_groups)."""
    cpu = device.type == "cpu"
    return row_tile(rows, min(row_size, CHUNK), 4096 if cpu else 2048, 4096 if cpu else 1024)


def _nonempty(t, stand_in):
    """An empty tensor may have a null pointer, which GPU launchers refuse; it is never read or written."""
    return t if t.numel() > 0 else stand_in


def _launch_options(rows, row_size, device):
    check_grid_axis1(device, "affine_coupling", "a sample's element count", row_size, CHUNK)
    block_rows, block = _tile(rows, row_size, device)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(row_size, CHUNK))
    return grid, dict(BLOCK_ROWS=block_rows, BLOCK=block, num_warps=max(1, min(4, block_rows * block // 256)))


def gpu_variants(name, constexprs, ints):
    """The tile and warps a GPU launch takes (genfast.testing.triton_gpu_compile)."""
    import torch

    _, options = _launch_options(ints["num_rows"], ints["row_size"], torch.device("cuda"))
    warps = options.pop("num_warps")
    return [(options, warps, None)]


def launch_affine_coupling(x, shift, scale, index, y, partial, scale_fn: int, param: float, glow_order: bool,
                           inverse: bool, full: bool):
    """y and partial[b, c], the logdet of row b summed over chunk c of CHUNK elements, for (B, N) x and
    (B, M) shift/scale with contiguous rows (any row stride); y and partial contiguous."""
    rows, row_size = x.shape
    if rows == 0 or row_size == 0:
        return
    grid, options = _launch_options(rows, row_size, x.device)
    affine_coupling_kernel[grid](
        x, _nonempty(shift, x), _nonempty(scale, x), index, y, partial, float(param), rows, row_size,
        x.stride(0), shift.stride(0), scale.stride(0), CHUNK, partial.shape[1],
        SCALE_FN=int(scale_fn), GLOW_ORDER=bool(glow_order), INVERSE=bool(inverse), FULL=bool(full), **options)


def launch_affine_coupling_backward(grad_y, grad_logdet, x, shift, scale, index, grad_x, grad_shift, grad_scale,
                                    scale_fn: int, param: float, glow_order: bool, inverse: bool, full: bool):
    """grad_x (B, N), grad_shift and grad_scale (B, M), all contiguous, from grad_y (B, N) and
    grad_logdet (B,) float32; the inputs as for launch_affine_coupling."""
    rows, row_size = x.shape
    if rows == 0 or row_size == 0:
        return
    grid, options = _launch_options(rows, row_size, x.device)
    affine_coupling_backward_kernel[grid](
        grad_y, grad_logdet, x, _nonempty(shift, x), _nonempty(scale, x), index, grad_x,
        _nonempty(grad_shift, grad_x), _nonempty(grad_scale, grad_x), float(param), rows, row_size,
        grad_shift.shape[1], grad_y.stride(0), x.stride(0), shift.stride(0), scale.stride(0), CHUNK,
        SCALE_FN=int(scale_fn), GLOW_ORDER=bool(glow_order), INVERSE=bool(inverse), FULL=bool(full), **options)
