"""Binary NADE (Larochelle & Murray 2011) in Triton: the conditionals, their backward and ancestral
sampling, with the algorithms of kernels/common/nade.h and csrc/cpu/nade_conditionals.cpp.

One program walks the D steps for a block of BLOCK_B samples, holding their running
pre-activations a as a (BLOCK_B, BLOCK_H) float32 tile, BLOCK_H = next_power_of_2(H): O(H) working
memory per sample, never the (D, H) of all steps. Step k visits d = order[k] (the natural order, one
ordering shared by all samples, or one per sample; with a shared ordering the rows of V and W^T are
read once for the whole block). The hidden size is limited to MAX_HIDDEN = 2048 (the tile lives in
registers; there is no loop over chunks of H): the launchers raise ValueError above it.

The sigmoid is the Cephes-based sigmoid_f32 of affine_coupling.py, as on the other backends; the
ReLU propagates NaN. The ordering kind and the activation are constexpr, so each variant is
branch-free. The backward accumulates its parameter gradients across programs with atomic adds (one
per program and element: a block's rows are summed first), so their summation order, unlike the
CPU's, is not fixed.
"""

import triton
import triton.language as tl

from .affine_coupling import sigmoid_f32
from .common import philox_key_words
from .philox import PHILOX_KEY_WORDS, philox_uniform

MAX_HIDDEN = 2048
# Ordering kinds: natural order, one (D,) ordering for all samples, one (B, D) per sample.
ORDER_NONE, ORDER_SHARED, ORDER_PER_ROW = 0, 1, 2


@triton.jit
def _activation(a, RELU: tl.constexpr):
    if RELU:
        return tl.where(a > 0.0, a, tl.where(a != a, a, 0.0))
    else:
        return sigmoid_f32(a)


@triton.jit
def _step_dims(order_ptr, rows, row_mask, k, D, ORDER: tl.constexpr):
    """The dimension step k visits: [BLOCK_B] int64 with per-row orderings, else a scalar."""
    if ORDER == 2:
        d = tl.load(order_ptr + rows * D + k, mask=row_mask, other=0)
    elif ORDER == 1:
        d = tl.load(order_ptr + k)
    else:
        d = k
    return tl.cast(d, tl.int64)


@triton.jit
def _param_rows(ptr, d, hs, h_mask, row_mask, H, PER_ROW: tl.constexpr):
    """Rows d of a (D, H) parameter: [BLOCK_B, BLOCK_H] gathered per row, or [1, BLOCK_H] shared."""
    if PER_ROW:
        return tl.load(ptr + d[:, None] * H + hs[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
    else:
        return tl.load(ptr + d * H + hs, mask=h_mask, other=0.0)[None, :]


@triton.jit
def _param_elems(ptr, d, row_mask, PER_ROW: tl.constexpr):
    """Elements d of a (D,) parameter: [BLOCK_B] per row, or a scalar."""
    if PER_ROW:
        return tl.load(ptr + d, mask=row_mask, other=0.0)
    else:
        return tl.load(ptr + d)


@triton.jit
def _add_scaled_rows(a, w, value):
    """a + w * value, where value != 0 only (as the C++ skips zeros: 0 * inf stays out)."""
    return a + tl.where(value[:, None] != 0.0, w * value[:, None], 0.0)


@triton.jit
def _block_start(c_ptr, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's rows and hidden units, their masks, c, and the rows' pre-activations a = c."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    hs = tl.arange(0, BLOCK_H)
    h_mask = hs < H
    c = tl.load(c_ptr + hs, mask=h_mask, other=0.0)
    return rows, row_mask, hs, h_mask, c, tl.zeros((BLOCK_B, BLOCK_H), tl.float32) + c[None, :]


@triton.jit
def nade_conditionals_kernel(
    x_ptr, w_ptr, c_ptr, v_ptr, b_ptr, order_ptr, logits_ptr, B, D, H,
    ORDER: tl.constexpr, RELU: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    PER_ROW: tl.constexpr = ORDER == 2
    rows, row_mask, hs, h_mask, c, a = _block_start(c_ptr, B, H, BLOCK_B, BLOCK_H)
    for k in range(0, D):
        d = _step_dims(order_ptr, rows, row_mask, k, D, ORDER)
        v = _param_rows(v_ptr, d, hs, h_mask, row_mask, H, PER_ROW)
        logit = _param_elems(b_ptr, d, row_mask, PER_ROW) + tl.sum(v * _activation(a, RELU), axis=1)
        tl.store(logits_ptr + rows * D + d, logit.to(logits_ptr.dtype.element_ty), mask=row_mask)
        value = tl.load(x_ptr + rows * D + d, mask=row_mask, other=0.0).to(tl.float32)
        a = _add_scaled_rows(a, _param_rows(w_ptr, d, hs, h_mask, row_mask, H, PER_ROW), value)


@triton.jit
def nade_conditionals_backward_kernel(
    grad_logits_ptr, x_ptr, w_ptr, c_ptr, v_ptr, b_ptr, order_ptr,
    grad_w_ptr, grad_v_ptr, grad_b_ptr, grad_c_ptr, grad_x_ptr, B, D, H,
    ORDER: tl.constexpr, RELU: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    PER_ROW: tl.constexpr = ORDER == 2
    rows, row_mask, hs, h_mask, c, a = _block_start(c_ptr, B, H, BLOCK_B, BLOCK_H)
    tile_mask = row_mask[:, None] & h_mask[None, :]
    # a after the last step: c + sum over d of W^T[d] x[d], in the natural order.
    remaining = tl.zeros((BLOCK_B,), tl.int32)  # nonzero x not yet subtracted again
    for j in range(0, D):
        value = tl.load(x_ptr + rows * D + j, mask=row_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + tl.cast(j, tl.int64) * H + hs, mask=h_mask, other=0.0)
        a = _add_scaled_rows(a, w[None, :], value)
        remaining += tl.where(value != 0.0, 1, 0)
    running = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)  # the gradient reaching a_{k+1}
    for step in range(0, D):
        k = D - 1 - step
        d = _step_dims(order_ptr, rows, row_mask, k, D, ORDER)
        value = tl.load(x_ptr + rows * D + d, mask=row_mask, other=0.0).to(tl.float32)
        w = _param_rows(w_ptr, d, hs, h_mask, row_mask, H, PER_ROW)
        tl.store(grad_x_ptr + rows * D + d, tl.sum(w * running, axis=1), mask=row_mask)
        gw = tl.where(value[:, None] != 0.0, running * value[:, None], 0.0)
        a = a - tl.where(value[:, None] != 0.0, w * value[:, None], 0.0)  # back to a_k
        # Before the first nonzero x, a_k is c exactly, as in the forward (ReLU's kink at 0).
        remaining -= tl.where(value != 0.0, 1, 0)
        a = tl.where((remaining == 0)[:, None], c[None, :], a)
        g = tl.load(grad_logits_ptr + rows * D + d, mask=row_mask, other=0.0).to(tl.float32)
        h = _activation(a, RELU)
        gv = tl.where(row_mask[:, None], g[:, None] * h, 0.0)
        if RELU:
            slope = tl.where(a > 0.0, 1.0, 0.0)
        else:
            slope = h * (1.0 - h)
        running += g[:, None] * _param_rows(v_ptr, d, hs, h_mask, row_mask, H, PER_ROW) * slope
        if PER_ROW:
            offsets = d[:, None] * H + hs[None, :]
            tl.atomic_add(grad_w_ptr + offsets, gw, mask=tile_mask & (value[:, None] != 0.0))
            tl.atomic_add(grad_v_ptr + offsets, gv, mask=tile_mask)
            tl.atomic_add(grad_b_ptr + d, g, mask=row_mask)
        else:
            tl.atomic_add(grad_w_ptr + d * H + hs, tl.sum(gw, axis=0), mask=h_mask)
            tl.atomic_add(grad_v_ptr + d * H + hs, tl.sum(gv, axis=0), mask=h_mask)
            tl.atomic_add(grad_b_ptr + d, tl.sum(g, axis=0))
    running = tl.where(row_mask[:, None], running, 0.0)
    tl.atomic_add(grad_c_ptr + hs, tl.sum(running, axis=0), mask=h_mask)


@triton.jit(do_not_specialize=PHILOX_KEY_WORDS)
def nade_sample_kernel(
    w_ptr, c_ptr, v_ptr, b_ptr, uniforms_ptr, order_ptr, observed_ptr, out_ptr,
    seed_lo, seed_hi, base_lo, base_hi, num_observed, B, D, H,
    ORDER: tl.constexpr, RELU: tl.constexpr, GIVEN_UNIFORMS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    PER_ROW: tl.constexpr = ORDER == 2
    rows, row_mask, hs, h_mask, c, a = _block_start(c_ptr, B, H, BLOCK_B, BLOCK_H)
    # Conditional completion: the first num_observed steps copy the observed values.
    for k in range(0, num_observed):
        d = _step_dims(order_ptr, rows, row_mask, k, D, ORDER)
        index = rows * D + d
        value = tl.load(observed_ptr + index, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + index, value.to(out_ptr.dtype.element_ty), mask=row_mask)
        a = _add_scaled_rows(a, _param_rows(w_ptr, d, hs, h_mask, row_mask, H, PER_ROW), value)
    for k in range(num_observed, D):
        d = _step_dims(order_ptr, rows, row_mask, k, D, ORDER)
        index = rows * D + d
        v = _param_rows(v_ptr, d, hs, h_mask, row_mask, H, PER_ROW)
        logit = _param_elems(b_ptr, d, row_mask, PER_ROW) + tl.sum(v * _activation(a, RELU), axis=1)
        if GIVEN_UNIFORMS:
            u = tl.load(uniforms_ptr + index, mask=row_mask, other=1.0).to(tl.float32)
        else:
            u = philox_uniform(index, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), base_lo.to(tl.uint32),
                                base_hi.to(tl.uint32))
        value = tl.where(logit != logit, logit, tl.where(u < sigmoid_f32(logit), 1.0, 0.0))  # NaN propagates
        tl.store(out_ptr + index, value.to(out_ptr.dtype.element_ty), mask=row_mask)
        a = _add_scaled_rows(a, _param_rows(w_ptr, d, hs, h_mask, row_mask, H, PER_ROW), value)


def _config(device, hidden, tile_elements, block_b):
    """(BLOCK_B, BLOCK_H, num_warps) for a hidden size; ValueError above MAX_HIDDEN. On a GPU, BLOCK_B
    keeps a tile near tile_elements floats (ptxas -v on sm_90: no spills beyond a few bytes)."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"genfast's Triton NADE kernels support a hidden size H up to {MAX_HIDDEN}, got H = {hidden}")
    block_h = triton.next_power_of_2(max(hidden, 1))
    if block_b is None:
        # The interpreter's cost is per program and step: large blocks of rows.
        block_b = 64 if device.type == "cpu" else max(1, min(16, tile_elements // block_h))
    if block_b < 1 or block_b & (block_b - 1):
        raise ValueError(f"block_b must be a power of two, got {block_b}")
    num_warps = max(4, min(8, block_b * block_h // 256))
    return block_b, block_h, num_warps


def _order_kind(ordering, per_row):
    if ordering is None:
        return ORDER_NONE
    return ORDER_PER_ROW if per_row else ORDER_SHARED


def _tile_elements(kernel, per_row):
    """The floats a GPU tile of `kernel` holds (_config): fewer where per-row orderings or the
    backward's gradients take registers."""
    return 4096 if per_row or kernel is nade_conditionals_backward_kernel else 8192


def gpu_variants(name, constexprs, ints):
    """The block of rows and warps a GPU launch takes (genfast.testing.triton_gpu_compile)."""
    import torch

    per_row = constexprs["ORDER"] == ORDER_PER_ROW
    block_b, block_h, warps = _config(torch.device("cuda"), ints["H"], _tile_elements(globals()[name], per_row), None)
    return [(dict(BLOCK_B=block_b, BLOCK_H=block_h), warps, None)]


def launch_nade_conditionals(x, w_t, c, v, b, ordering, per_row, relu, logits, block_b=None, wrap=None):
    """logits (B, D), in x's dtype, of x (B, D) given w_t (D, H), c (H), v (D, H), b (D) (float32);
    ordering None, (D,) or, with per_row, (B, D) int64. All contiguous; logits is written.
    wrap: torch.library.wrap_triton inside a triton_op."""
    rows, dims = x.shape
    hidden = c.shape[0]
    block_b, block_h, num_warps = _config(x.device, hidden, _tile_elements(nade_conditionals_kernel, per_row),
                                          block_b)
    if rows == 0 or dims == 0:
        return
    kernel = nade_conditionals_kernel if wrap is None else wrap(nade_conditionals_kernel)
    kernel[(triton.cdiv(rows, block_b),)](
        x, w_t, c, v, b, ordering if ordering is not None else b, logits, rows, dims, hidden,
        ORDER=_order_kind(ordering, per_row), RELU=bool(relu), BLOCK_B=block_b, BLOCK_H=block_h,
        num_warps=num_warps,
    )


def launch_nade_conditionals_backward(grad_logits, x, w_t, c, v, b, ordering, per_row, relu, grad_w_t, grad_v, grad_b,
                                      grad_c, grad_x, block_b=None, wrap=None):
    """The gradients of launch_nade_conditionals' logits for grad_logits (B, D) in x's dtype:
    grad_w_t (D, H), grad_v (D, H), grad_b (D), grad_c (H) float32, zero-initialized by the caller
    and accumulated into (atomically, across blocks of samples); grad_x (B, D) float32, written."""
    rows, dims = x.shape
    hidden = c.shape[0]
    block_b, block_h, num_warps = _config(x.device, hidden, _tile_elements(nade_conditionals_backward_kernel, per_row),
                                          block_b)
    if rows == 0 or dims == 0:
        return
    kernel = nade_conditionals_backward_kernel if wrap is None else wrap(nade_conditionals_backward_kernel)
    kernel[(triton.cdiv(rows, block_b),)](
        grad_logits, x, w_t, c, v, b, ordering if ordering is not None else b,
        grad_w_t, grad_v, grad_b, grad_c, grad_x, rows, dims, hidden,
        ORDER=_order_kind(ordering, per_row), RELU=bool(relu), BLOCK_B=block_b, BLOCK_H=block_h,
        num_warps=num_warps,
    )


def launch_nade_sample(w_t, c, v, b, uniforms, seed, offset, ordering, per_row, relu, observed, num_observed, x_out,
                       block_b=None, wrap=None):
    """Samples x_out (B, D) (any float dtype, written with 0 and 1): step k sets x[o_k] = 1 where
    u < sigmoid(logit[o_k]), u = uniforms[row, o_k] (a (B, D) tensor) or, when uniforms is None,
    element row * D + o_k of the Philox stream of (seed, offset) (genfast.reference.random.
    philox_uniform). The first num_observed steps copy observed (B, D) (x_out's dtype; None when
    num_observed == 0) instead."""
    rows, dims = x_out.shape
    hidden = c.shape[0]
    block_b, block_h, num_warps = _config(x_out.device, hidden, _tile_elements(nade_sample_kernel, per_row), block_b)
    if rows == 0 or dims == 0:
        return
    num_observed = max(0, min(int(num_observed), dims))
    if num_observed > 0 and observed is None:
        raise ValueError("launch_nade_sample: num_observed > 0 needs observed values")
    kernel = nade_sample_kernel if wrap is None else wrap(nade_sample_kernel)
    kernel[(triton.cdiv(rows, block_b),)](
        w_t, c, v, b, uniforms if uniforms is not None else b, ordering if ordering is not None else b,
        observed if observed is not None else x_out, x_out, *philox_key_words(seed, offset), num_observed,
        rows, dims, hidden,
        ORDER=_order_kind(ordering, per_row), RELU=bool(relu), GIVEN_UNIFORMS=uniforms is not None,
        BLOCK_B=block_b, BLOCK_H=block_h, num_warps=num_warps,
    )
