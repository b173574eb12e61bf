"""Merging partial attentions in Triton (kernels/common/attention_merge.h): a program per tile of rows,
each row's head dim in one block, the states in a loop; rows are (outer, inner) pairs with a stride
each, and states lie at offsets from state 0's pointer (AttentionMergeStates: eight listed, later
ones evenly spaced). lse is to base e^ln_base. A state of lse -inf has no keys and is not read."""

import triton
import triton.language as tl

from .affine_coupling import exp_f32, log_f32

TILE_ELEMENTS = 4096  # rows x the head dim's block a program takes


# lse's offsets vary with the rows' count (a stacked lse's spacing): not specialized on, which would
# compile anew for each count of 1 or a multiple of 16. o's are, so that aligned states take wide loads.
_LSE_PLACES = [f"lse_at{k}" for k in range(8)] + ["lse_spacing"]


@triton.jit
def _state_at(s, at0, at1, at2, at3, at4, at5, at6, at7, spacing):
    """State s's offset from state 0's (attention_merge_state_at): listed for the first eight, then
    evenly spaced."""
    at = tl.cast(s, tl.int64) * spacing
    at = tl.where(s == 0, at0, at)
    at = tl.where(s == 1, at1, at)
    at = tl.where(s == 2, at2, at)
    at = tl.where(s == 3, at3, at)
    at = tl.where(s == 4, at4, at)
    at = tl.where(s == 5, at5, at)
    at = tl.where(s == 6, at6, at)
    return tl.where(s == 7, at7, at)


@triton.jit
def _merged_lse(lse_rows, live, states, ln_base, lse_at0, lse_at1, lse_at2, lse_at3, lse_at4, lse_at5, lse_at6,
                lse_at7, lse_spacing):
    """The rows' merged lse: log_b sum_s b^lse_s, -inf where every state's is, NaN where any is."""
    most = tl.full(lse_rows.shape, float("-inf"), tl.float32)
    for s in range(states):
        most = tl.maximum(most, tl.load(lse_rows + _state_at(s, lse_at0, lse_at1, lse_at2, lse_at3, lse_at4, lse_at5, lse_at6, lse_at7, lse_spacing), mask=live, other=float("-inf")),
                          propagate_nan=tl.PropagateNan.ALL)
    seen = most != float("-inf")
    total = tl.zeros(lse_rows.shape, tl.float32)
    for s in range(states):
        lse_s = tl.load(lse_rows + _state_at(s, lse_at0, lse_at1, lse_at2, lse_at3, lse_at4, lse_at5, lse_at6, lse_at7, lse_spacing), mask=live, other=float("-inf"))
        total += tl.where(seen, exp_f32((lse_s - most) * ln_base), 0.0)
    return tl.where(seen, most + log_f32(tl.where(seen, total, 1.0)) / ln_base, float("-inf"))


@triton.jit
def _rows(o_ptr, lse_ptr, rows, rows_inner, so_o, so_i, sl_o, sl_i, BLOCK_R: tl.constexpr):
    """The tile's rows, which of them exist, and their rows of state 0's o and lse."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    outer, inner = r // rows_inner, r % rows_inner
    return r, r < rows, o_ptr + outer * so_o + inner * so_i, lse_ptr + outer * sl_o + inner * sl_i


@triton.jit(do_not_specialize=_LSE_PLACES)
def attention_merge_kernel(o_ptr, lse_ptr, out_ptr, out_lse_ptr, states, rows, rows_inner, D, so_o, so_i, sl_o, sl_i,
                           sout_o, sout_i, soutl_o, soutl_i, ln_base, o_at0, o_at1, o_at2, o_at3, o_at4, o_at5, o_at6, o_at7, o_spacing, lse_at0, lse_at1, lse_at2,
                           lse_at3, lse_at4, lse_at5, lse_at6, lse_at7, lse_spacing, BLOCK_R: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """out (rows_outer, rows_inner, D), features contiguous, and out_lse (rows_outer, rows_inner), each
    addressed by its strides: sum_s b^(lse_s - lse) o_s and lse. Either may be one of the states (a
    merge in place)."""
    r, live, o_rows, lse_rows = _rows(o_ptr, lse_ptr, rows, rows_inner, so_o, so_i, sl_o, sl_i, BLOCK_R)
    merged = _merged_lse(lse_rows, live, states, ln_base, lse_at0, lse_at1, lse_at2, lse_at3, lse_at4, lse_at5, lse_at6,
                         lse_at7, lse_spacing)
    d = tl.arange(0, BLOCK_D)
    cols = live[:, None] & (d[None, :] < D)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for s in range(states):
        lse_s = tl.load(lse_rows + _state_at(s, lse_at0, lse_at1, lse_at2, lse_at3, lse_at4, lse_at5, lse_at6, lse_at7, lse_spacing), mask=live, other=float("-inf"))
        keys = lse_s != float("-inf")
        weight = tl.where(keys, exp_f32((lse_s - merged) * ln_base), 0.0)
        o_s = tl.load(o_rows[:, None] + _state_at(s, o_at0, o_at1, o_at2, o_at3, o_at4, o_at5, o_at6, o_at7, o_spacing) + d[None, :], mask=cols & keys[:, None], other=0.0)
        acc += weight[:, None] * o_s.to(tl.float32)
    tl.debug_barrier()  # every thread's reads of the states done: out may be one of them
    outer, inner = r // rows_inner, r % rows_inner
    tl.store(out_ptr + (outer * sout_o + inner * sout_i)[:, None] + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=cols)
    tl.store(out_lse_ptr + outer * soutl_o + inner * soutl_i, merged, mask=live)


@triton.jit(do_not_specialize=_LSE_PLACES)
def attention_merge_backward_kernel(grad_out_ptr, grad_lse_ptr, o_ptr, lse_ptr, grad_o_ptr, grad_lse_states_ptr,
                                    states, rows, rows_inner, D, so_o, so_i, sl_o, sl_i, ln_base, o_at0, o_at1, o_at2, o_at3,
                                    o_at4, o_at5, o_at6, o_at7, o_spacing, lse_at0, lse_at1, lse_at2, lse_at3, lse_at4,
                                    lse_at5, lse_at6, lse_at7, lse_spacing, HAS_GRAD_LSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_o (states, rows, D) = a_s g and grad_lse_states (states, rows) = a_s (ln_base (d_s - sum_t
    a_t d_t) + g_lse), d_s = g . o_s, contiguous; d_s waits in grad_lse_states until the sum is known."""
    r, live, o_rows, lse_rows = _rows(o_ptr, lse_ptr, rows, rows_inner, so_o, so_i, sl_o, sl_i, BLOCK_R)
    merged = _merged_lse(lse_rows, live, states, ln_base, lse_at0, lse_at1, lse_at2, lse_at3, lse_at4, lse_at5, lse_at6,
                         lse_at7, lse_spacing)
    d = tl.arange(0, BLOCK_D)
    cols = live[:, None] & (d[None, :] < D)
    g = tl.load(grad_out_ptr + r[:, None] * D + d[None, :], mask=cols, other=0.0).to(tl.float32)
    mean = tl.zeros((BLOCK_R,), tl.float32)
    for s in range(states):
        lse_s = tl.load(lse_rows + _state_at(s, lse_at0, lse_at1, lse_at2, lse_at3, lse_at4, lse_at5, lse_at6, lse_at7, lse_spacing), mask=live, other=float("-inf"))
        keys = lse_s != float("-inf")
        weight = tl.where(keys, exp_f32((lse_s - merged) * ln_base), 0.0)
        o_s = tl.load(o_rows[:, None] + _state_at(s, o_at0, o_at1, o_at2, o_at3, o_at4, o_at5, o_at6, o_at7, o_spacing) + d[None, :], mask=cols & keys[:, None], other=0.0)
        dot = tl.where(keys, tl.sum(g * o_s.to(tl.float32), 1), 0.0)  # g . 0 is NaN where g is infinite
        tl.store(grad_o_ptr + (tl.cast(s, tl.int64) * rows + r)[:, None] * D + d[None, :],
                 tl.where(keys[:, None], weight[:, None] * g, 0.0).to(grad_o_ptr.dtype.element_ty), mask=cols)
        tl.store(grad_lse_states_ptr + tl.cast(s, tl.int64) * rows + r, dot, mask=live)
        mean += weight * dot
    grad_lse = tl.load(grad_lse_ptr + r, mask=live, other=0.0) if HAS_GRAD_LSE else tl.zeros((BLOCK_R,), tl.float32)
    tl.debug_barrier()  # the dots stored above, by whichever threads held them
    for s in range(states):
        lse_s = tl.load(lse_rows + _state_at(s, lse_at0, lse_at1, lse_at2, lse_at3, lse_at4, lse_at5, lse_at6, lse_at7, lse_spacing), mask=live, other=float("-inf"))
        keys = lse_s != float("-inf")
        dot = tl.load(grad_lse_states_ptr + tl.cast(s, tl.int64) * rows + r, mask=live, other=0.0)
        grad = tl.where(keys, exp_f32((lse_s - merged) * ln_base) * (ln_base * (dot - mean) + grad_lse), 0.0)
        tl.store(grad_lse_states_ptr + tl.cast(s, tl.int64) * rows + r, grad, mask=live)


def _tiles(rows, head_dim):
    block_d = triton.next_power_of_2(max(head_dim, 1))
    block_r = min(triton.next_power_of_2(max(rows, 1)), max(1, TILE_ELEMENTS // block_d))
    return triton.cdiv(rows, block_r), block_r, block_d


def launch_attention_merge(o, lse, places, ln_base, out, out_lse):
    """o and lse: the states' (rows_outer, rows_inner, D), features contiguous, and (rows_outer,
    rows_inner) float32 to base e^ln_base, each sharing one layout, at places (o's and lse's: nine
    offsets each from state 0's, eight listed and the spacing past them); out (rows_outer, rows_inner,
    D), features contiguous, and out_lse (rows_outer, rows_inner), any strides, either of them one of
    the states or apart from them all."""
    outer, inner, head_dim = o[0].shape
    rows = outer * inner
    if rows == 0:
        return
    grid, block_r, block_d = _tiles(rows, head_dim)
    attention_merge_kernel[(grid,)](o[0], lse[0], out, out_lse, len(o), rows, inner, head_dim, *o[0].stride()[:2],
                                    *lse[0].stride(), *out.stride()[:2], *out_lse.stride(), ln_base, *places[0],
                                    *places[1], BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


def launch_attention_merge_backward(grad_out, grad_lse, o, lse, places, ln_base, grad_o, grad_lse_states):
    """grad_out (rows_outer, rows_inner, D) and grad_lse (or None) contiguous, o, lse and places as
    launch_attention_merge's; grad_o and grad_lse_states the states' stacked, contiguous."""
    outer, inner, head_dim = o[0].shape
    rows = outer * inner
    if rows == 0:
        return
    grid, block_r, block_d = _tiles(rows, head_dim)
    attention_merge_backward_kernel[(grid,)](
        grad_out, grad_lse_states if grad_lse is None else grad_lse, o[0], lse[0], grad_o, grad_lse_states, len(o),
        rows, inner, head_dim, *o[0].stride()[:2], *lse[0].stride(), ln_base, *places[0], *places[1],
        HAS_GRAD_LSE=grad_lse is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
