"""Rotary position embedding in Triton (kernels/common/rotary.h): one program per token, turning
every head's planes, a tile of heads at a time; out may be x (each plane read before it is written)."""

import triton
import triton.language as tl


@triton.jit
def rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, positions_ptr, seqlen, heads, half, rest, table_rows, x_stride_0,
                  x_stride_1, x_stride_2, out_stride_0, out_stride_1, out_stride_2, table_stride, position_stride_0,
                  position_stride_1, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, COPY_REST: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b, i = token // seqlen, token % seqlen
    position = tl.load(positions_ptr + b * position_stride_0 + i * position_stride_1).to(tl.int64)
    m = tl.arange(0, BLOCK_P)
    # a position outside the tables (not checked on a GPU) turns by nothing, as in FlashAttention
    in_table = (m < half) & (position >= 0) & (position < table_rows)
    c = tl.load(cos_ptr + position * table_stride + m, mask=in_table, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + position * table_stride + m, mask=in_table, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    if INTERLEAVED:
        first, second = 2 * m, 2 * m + 1
    else:
        first, second = m, m + half
    x_row = x_ptr + b * x_stride_0 + i * x_stride_1
    out_row = out_ptr + b * out_stride_0 + i * out_stride_1
    for h0 in range(0, heads, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)  # a head stride of a transposed view is a sequence's
        inside = (h[:, None] < heads) & (m[None, :] < half)
        x_head, out_head = x_row + h[:, None] * x_stride_2, out_row + h[:, None] * out_stride_2
        x1 = tl.load(x_head + first[None, :], mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(x_head + second[None, :], mask=inside, other=0.0).to(tl.float32)
        # (x1, x2) -> (x1 c - x2 s, x1 s + x2 c), rotary_turn
        tl.store(out_head + first[None, :], (x1 * c[None, :] - x2 * s[None, :]).to(out_ptr.dtype.element_ty),
                 mask=inside)
        tl.store(out_head + second[None, :], (x1 * s[None, :] + x2 * c[None, :]).to(out_ptr.dtype.element_ty),
                 mask=inside)
        if COPY_REST:
            r = 2 * half + tl.arange(0, BLOCK_R)
            kept = (h[:, None] < heads) & (r[None, :] < 2 * half + rest)
            tl.store(out_head + r[None, :], tl.load(x_head + r[None, :], mask=kept), mask=kept)


def launch_rotary(x, out, cos, sin, positions, interleaved, inverse):
    """x and out (batch, seqlen, heads, head_dim) with contiguous features (out may be x); cos and
    sin (positions, half) with contiguous features and one row stride; positions int32 (batch, seqlen)."""
    batch, seqlen, heads, head_dim = x.shape
    tokens = batch * seqlen
    if tokens == 0 or heads == 0 or head_dim == 0:
        return
    half = cos.shape[1]
    rest = head_dim - 2 * half
    block_p = triton.next_power_of_2(max(half, 1))
    block_h = min(triton.next_power_of_2(heads), max(1, 2048 // block_p))
    rotary_kernel[(tokens,)](
        x, out, cos, sin, positions, seqlen, heads, half, rest, cos.shape[0], *x.stride()[:3], *out.stride()[:3],
        cos.stride(0),
        *positions.stride(), INTERLEAVED=bool(interleaved), INVERSE=bool(inverse),
        COPY_REST=out.data_ptr() != x.data_ptr() and rest > 0, BLOCK_H=block_h, BLOCK_P=block_p,
        BLOCK_R=triton.next_power_of_2(max(rest, 1)))
