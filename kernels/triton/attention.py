"""Scaled-dot-product attention in Triton, FlashAttention-2 style: the semantics of
genfast/reference/attention.py and kernels/common/attention.h (csrc/cpu/attention.cpp).

Per batch b and query head h (key/value head h // (H / Hk)):
    s_ij = scale q_i . k_j;  s = softcap tanh(s / softcap);  s -= slope_h |i + Lk - Lq - j|;
    s += bias_ij, or s = -inf where a bool mask is false;  s = -inf unless i + band_lo <= j <= i + band_hi;
    o_i = sum_j dropout(softmax(s_i))_j v_j;  lse_i = logsumexp_j s_ij
A row masking every key has o = 0 and lse = -inf. Attention sinks (sink_h a query head) join each
row's log-sum-exp without a value: lse_i = log(e^sink_h + sum_j e^s_ij), o_i = sum_j e^(s_ij - lse_i)
v_j (a row masking every key: o = 0, lse = sink_h). Dropout keeps element ((b H + h) Lq + i) Lk + j
where its Philox uniform (genfast.reference.random.philox_uniform) is >= dropout_p, scaled by
1 / (1 - dropout_p).

The forward walks, per block of queries, only the key blocks its band can reach, with an online
softmax. The backward is two deterministic passes without atomics: one program per block of keys
for dK and dV (looping over the query heads of its key head and the query blocks its band reaches),
one per block of queries for dQ (and dS, when asked for); or, where GENFAST_TRITON_ATOMIC_DQ=1 and
the call is not deterministic, the first pass alone, adding each block's dQ to a float32 dQ with
atomics (5 products per block instead of 7, but slower on an H200: _atomic_dq). exp, log and tanh
are the Cephes polynomials of affine_coupling.py (the same on every backend; tl.exp is ex2.approx
on NVIDIA GPUs), but for the softmax's exponentials of float16 and bfloat16 inputs under a positive
scale, which take ex2.approx in base 2 with the scale folded in, as the CUDA kernels do (_fast_exp).
"""

import functools
import math
import os

import triton
import triton.language as tl

from .affine_coupling import exp_f32, log_f32, tanh_f32
from .common import philox_key_words
from .philox import PHILOX_KEY_WORDS, philox_uniform, philox_words, uniform_from_bits

UNBOUNDED = 1 << 62  # band_lo = -UNBOUNDED or band_hi = UNBOUNDED: no bound
MAX_HEAD_DIM = 512
# The backward's dS buffer for a mask gradient summed over a broadcast dim, at most (floats; 64 MiB)
# where the summed gradient is smaller: see launch_attention_backward.
MASK_GRAD_CHUNK_FLOATS = 1 << 24

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2
# Dropout off, one Philox per element, or one per group of four keys (each row's stream starts at
# a whole group: dense inputs with Lk a multiple of 4; key blocks start at multiples of BLOCK_N).
DROPOUT_NONE, DROPOUT_ELEMENTS, DROPOUT_GROUPS = 0, 1, 2
DOT_F32, DOT_F16, DOT_BF16 = 0, 1, 2
# Band bounds may be 1 too: kept runtime values, as the Philox words are.
_NO_SPECIALIZE = PHILOX_KEY_WORDS + ["band_lo", "band_hi"]


@triton.jit
def _dot(a, b, DOT_KIND: tl.constexpr):
    """a @ b with a float32 accumulator: exact float32 products (ieee) or half-precision operands."""
    if DOT_KIND == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    elif DOT_KIND == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot_in_two_parts(a, b, DOT_KIND: tl.constexpr):
    """a @ b for float32 a, with a in two parts of the 16-bit operand type (its rounding and the
    rest): relative errors of 2^-22 (float16) or 2^-16 (bfloat16) where one part leaves 2^-11 or
    2^-8. For a forward whose float32 o feeds a mask gradient's delta (launch_attention_forward)."""
    if DOT_KIND == 0:
        return _dot(a, b, DOT_KIND)
    else:
        high = a.to(tl.float16) if DOT_KIND == 1 else a.to(tl.bfloat16)
        return _dot(high, b, DOT_KIND) + _dot(a - high.to(tl.float32), b, DOT_KIND)


@triton.jit
def _exp_units(x, FAST_EXP: tl.constexpr):
    """The softmax's exponential of x in its units: 2^x with FAST_EXP, the GPU's ex2.approx (2 ulp),
    as FlashAttention's kernels and genfast's CUDA kernels take it (_fast_exp); else e^x by the
    Cephes polynomial (exp_f32)."""
    if FAST_EXP:
        return tl.exp2(x)
    else:
        return exp_f32(x)


@triton.jit
def _exponent_factors(scale, FAST_EXP: tl.constexpr):
    """(raw, finished): the factors that take a block's q.k (a block needing only the scale) or its
    finished scores (_finish_scores') to the units of _exp_units. FAST_EXP folds the scale and
    log2(e) into one factor, positive there (_fast_exp), so that a row's maximum may be taken before
    the factor and p = 2^(x factor - m) is one FFMA and one MUFU an element, where the scale, the
    subtraction and log2(e) were three instructions."""
    if FAST_EXP:
        return scale * LOG2E, tl.full((), LOG2E, tl.float32)
    else:
        return scale, tl.full((), 1.0, tl.float32)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_max(s, INTERPRETED: tl.constexpr):
    """Each row's maximum, NaN where the row holds one (tl.max skips NaN, as fmax): on a GPU one
    FMNMX.NAN per pair; under the interpreter, which runs a reduction's combine function in Python,
    tl.max and a count of the NaN lanes."""
    if INTERPRETED:
        return tl.where(tl.sum((s != s).to(tl.int32), 1) > 0, float("nan"), tl.max(s, 1))
    else:
        return tl.reduce(s, 1, _max_keeping_nan)


@triton.jit
def _row_max_in_units(x, factor, INTERPRETED: tl.constexpr, FAST_EXP: tl.constexpr):
    """Each row's maximum of x factor (_exponent_factors): with FAST_EXP, whose factor is positive,
    the maximum of x times the factor (rounding keeps the order, so the two are equal), one multiply
    a row instead of one an element."""
    if FAST_EXP:
        return _row_max(x, INTERPRETED) * factor
    else:
        return _row_max(x * factor, INTERPRETED)


@triton.jit
def _lse_with_sink(lse, sink):
    """log(e^lse + e^sink): -inf only when both are, NaN when either is (kernels/common/attention.h's
    attention_lse_with_sink)."""
    high = tl.maximum(lse, sink, propagate_nan=tl.PropagateNan.ALL)
    low = tl.minimum(lse, sink)
    return tl.where(high == float("-inf"), high, high + log_f32(1.0 + exp_f32(low - high)))


@triton.jit
def _tile_and_chunk(tiles):
    """(tile, chunk) of a program on a grid whose first axis holds `tiles` tiles of each chunk (a
    batch's head, or kv head), tiles fastest, as a two-axis grid would launch them; int64 chunk. One
    axis: a GPU caps a grid's second at 65535, which a varlen batch's sequences times heads passes
    (2048 sequences of 32 heads)."""
    program = tl.program_id(0)
    return program % tiles, (program // tiles).to(tl.int64)


@triton.jit
def _block_inside(start_m, span, start_n, BLOCK_N: tl.constexpr, Lq, Lk, band_lo, band_hi):
    """Whether every query of [start_m, start_m + span) and key of [start_n, start_n + BLOCK_N) is
    inside the sequences and the band: with scores that need nothing more than scaling, such a block
    skips _finish_scores (a sixth of the forward's instructions a step at head dim 128). span: the
    tile's queries (of each head, in a stacked tile) inside the sequence; its other rows load q as
    0 and are not stored, so their scores need no mask."""
    return ((start_m + span <= Lq) & (start_n + BLOCK_N <= Lk) & (start_n - (start_m + span - 1) >= band_lo)
            & (start_n + BLOCK_N - 1 - start_m <= band_hi))


@triton.jit
def _mask_block(mask_ptr, b, h, offs_m, offs_n, Lq, Lk, smb, smh, smm, smn, MASK_KIND: tl.constexpr):
    """The mask's block for queries offs_m and keys offs_n ([M, N]; 0 without a mask), with what
    hides outside (Lq, Lk): false, or -inf for an additive mask. The loops load it before their
    first matrix product. Loaded after it, Triton's layout pass (which settles a conflict in favour
    of the layout it reached first, and reaches the later anchor first) could give the scores the
    load's layout as well as the products': the softmax then ran twice, once in each, with the
    reductions' shuffles between them. Forward, sm_90, bfloat16, head dim 128, 128 x 64 tiles, 8
    warps, a bool mask whose keys are 2 bytes apart: a step 1144 -> 948 instructions (Triton 3.6),
    2049 -> 852 (3.8); with contiguous keys the layouts did not conflict (797 and 712 either way)."""
    block = 0
    if MASK_KIND != 0:
        ptrs = (mask_ptr + b * smb + h * smh + offs_m[:, None].to(tl.int64) * smm
                + offs_n[None, :].to(tl.int64) * smn)
        inside = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        if MASK_KIND == 1:
            block = tl.load(ptrs, mask=inside, other=0)
        else:
            block = tl.load(ptrs, mask=inside, other=float("-inf"))
    return block


@triton.jit
def _mask_hides_all(mask_block, MASK_KIND: tl.constexpr):
    """Whether a mask's block (_mask_block) hides every score: all false, or all -inf for an additive
    mask (NaN does not hide)."""
    if MASK_KIND == 1:
        return tl.max((mask_block != 0).to(tl.int32)) == 0
    else:
        return tl.max((mask_block != float("-inf")).to(tl.int32)) == 0


@triton.jit
def _key_block_hidden(mask_ptr, b, h, offs_m, start_n, Lq, Lk, smb, smh, smm, smn, MASK_KIND: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    return _mask_hides_all(_mask_block(mask_ptr, b, h, offs_m, start_n + tl.arange(0, BLOCK_N), Lq, Lk, smb, smh, smm,
                                       smn, MASK_KIND), MASK_KIND)


@triton.jit
def _shown_keys(lo, hi, offs_m, mask_ptr, b, h, Lq, Lk, smb, smh, smm, smn, MASK_KIND: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The forward's span of keys [lo, hi) (lo a multiple of BLOCK_N) less the key blocks at either
    end that the mask hides whole from queries offs_m; [lo, hi) without a mask. As the CPU and CUDA
    kernels skip such blocks, a padding mask, a window or a document's bounds given as a mask cost
    about the blocks they show. The scans read the mask alone, before the loop: a test in the loop
    around its products stopped Triton (3.6 and 3.8) from pipelining its loads and products. Bounds
    that come from a reduction are not provably uniform, which costs the loop's step a little (128 x
    32 tiles, 8 warps, bf16, head dim 128: 470 -> 477 instructions on Triton 3.6, 437 -> 474 on 3.8)
    and cost the backward's passes more (the dQ pass's step 452 -> 690 on 3.8; the dK/dV pass's
    spills 32 -> 120 bytes on 3.6): they compute such blocks still."""
    if MASK_KIND != 0:
        searching = lo < hi
        while searching:
            hidden = _key_block_hidden(mask_ptr, b, h, offs_m, lo, Lq, Lk, smb, smh, smm, smn, MASK_KIND, BLOCK_N)
            lo = tl.where(hidden, lo + BLOCK_N, lo)
            searching = hidden & (lo < hi)
        last = lo + tl.maximum(hi - lo - 1, 0) // BLOCK_N * BLOCK_N  # the start of [lo, hi)'s last block
        searching = lo < hi
        while searching:
            hidden = _key_block_hidden(mask_ptr, b, h, offs_m, last, Lq, Lk, smb, smh, smm, smn, MASK_KIND, BLOCK_N)
            last = tl.where(hidden, last - BLOCK_N, last)
            searching = hidden & (last >= lo)
        hi = tl.minimum(hi, last + BLOCK_N)
    return lo, hi


@triton.jit
def _finish_scores(s, mask_block, offs_m, offs_n, Lq, Lk, slope, softcap, band_lo, band_hi, SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr):
    """The scores from scale q.k ([M, N]): soft-cap, ALiBi, the mask (its block, _mask_block), band,
    and -inf outside (Lq, Lk). Also returns 1 - tanh^2 of the soft-cap (s itself when there is none)."""
    if SOFTCAP:
        t = tanh_f32(s / softcap)
        s = softcap * t
        cap = 1.0 - t * t
    else:
        cap = s
    if HAS_ALIBI:
        distance = tl.abs(offs_m[:, None] + (Lk - Lq) - offs_n[None, :]).to(tl.float32)
        s = s - slope * distance
    inside = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if MASK_KIND == 1:
        s = tl.where(mask_block != 0, s, float("-inf"))
    elif MASK_KIND == 2:
        s = s + mask_block.to(tl.float32)
    diff = offs_n[None, :] - offs_m[:, None]
    s = tl.where(inside & (diff >= band_lo) & (diff <= band_hi), s, float("-inf"))
    return s, cap


@triton.jit
def _sequence(cu_q_ptr, cu_k_ptr, used_k_ptr, b, Lq, Lk, band_lo, band_hi, total_q, total_k, H,
              VARLEN: tl.constexpr, SEQUSED_K: tl.constexpr):
    """Where sequence b lies (kernels/common/attention.h, attention_sequence): (q_start, k_start, Lq, Lk,
    band_lo, band_hi, row_base, head_rows, row_length): query i of head h has lse and dropout row
    row_base + h head_rows + i, of row_length dropout columns, key j at column k_start + j. SEQUSED_K:
    the sequence has the first used_k_ptr[b] keys of its rows."""
    if VARLEN:
        q_start = tl.load(cu_q_ptr + b).to(tl.int64)
        k_start = tl.load(cu_k_ptr + b).to(tl.int64)
        lq = tl.load(cu_q_ptr + b + 1).to(tl.int64) - q_start
        if SEQUSED_K:
            lk = tl.load(used_k_ptr + b).to(tl.int64)
        else:
            lk = tl.load(cu_k_ptr + b + 1).to(tl.int64) - k_start
        return q_start, k_start, lq, lk, band_lo + (lk - lq), band_hi + (lk - lq), q_start, total_q, total_k
    else:
        zero = b * 0
        return zero, zero, Lq, Lk, band_lo, band_hi, b * H * Lq, Lq, Lk


@triton.jit
def _dropout_keeps(offs_m, offs_n, start_n, row0, row_length, col0, dropout_p, seed_lo, seed_hi, base_lo, base_hi,
                   DROPOUT: tl.constexpr):
    """Whether dropout keeps each element [M, N] of queries offs_m and keys offs_n = start_n + 0.."""
    row_first = (row0 + offs_m[:, None].to(tl.int64)) * row_length + col0
    if DROPOUT == 2:  # DROPOUT_GROUPS: each Philox's four words are four neighbouring keys
        BLOCK_M: tl.constexpr = offs_m.shape[0]
        BLOCK_N: tl.constexpr = offs_n.shape[0]
        group = (row_first + start_n) // 4 + tl.arange(0, BLOCK_N // 4)[None, :].to(tl.int64)
        r0, r1, r2, r3 = philox_words(group, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), base_lo.to(tl.uint32),
                                      base_hi.to(tl.uint32))
        # Word w of group g is key 4 g + w: join adds a last axis, so [g, i, j] = word 2 i + j.
        u = uniform_from_bits(tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N)))
    else:
        u = philox_uniform(row_first + offs_n[None, :].to(tl.int64), seed_lo.to(tl.uint32), seed_hi.to(tl.uint32),
                            base_lo.to(tl.uint32), base_hi.to(tl.uint32))
    return u >= dropout_p


@triton.jit
def _row_pointers(base, offs, stride, offs_d):
    return base + offs[:, None].to(tl.int64) * stride + offs_d[None, :]


@triton.jit
def _load_at(ptrs, offs, n, offs_d, d):
    """Rows offs below n, columns offs_d below d, of a tile whose pointers are ptrs; 0 elsewhere."""
    return tl.load(ptrs, mask=(offs[:, None] < n) & (offs_d[None, :] < d), other=0.0)


@triton.jit
def _load_rows(base, offs, n, stride, offs_d, d):
    return _load_at(_row_pointers(base, offs, stride, offs_d), offs, n, offs_d, d)


@triton.jit
def _block_steps(stride, BLOCK: tl.constexpr):
    """What a loop adds to its tiles' pointers to step a block of rows (64 bits: the product of a
    32-bit stride may not fit). Stepped so, the pointers of a loop's blocks took 24 fewer
    instructions a step of the forward than when formed anew from each block's rows (sm_90, head
    dim 128, 128 x 64 tiles, 8 warps)."""
    return tl.cast(stride, tl.int64) * BLOCK


@triton.jit
def _store_rows(base, value, offs, n, stride, offs_d, d):
    ptrs = base + offs[:, None].to(tl.int64) * stride + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=(offs[:, None] < n) & (offs_d[None, :] < d))


@triton.jit
def _paged_pointers(ptrs, base, pages_ptr, start_n, offs_n, Lk, page_size, page_stride, stride, offs_d,
                    PAGED: tl.constexpr):
    """The row pointers of keys offs_n (block start_n) in a paged cache (base: page 0's rows of the
    head): PAGED 1, pages of whole key blocks, one lookup a block; PAGED 2, any page size, each row's
    page (rows past Lk: page 0's). Else ptrs, which the loop steps. The lookup a row costs the step
    of 128 x 64 tiles 156 more instructions than one a block (1086, sm_90, bf16, head dim 128, 8
    warps); a runtime branch between the two spilled it (3716)."""
    if PAGED == 1:
        page = tl.load(pages_ptr + start_n // page_size).to(tl.int64)
        return _row_pointers(base + page * page_stride, offs_n - start_n + start_n % page_size, stride, offs_d)
    elif PAGED == 2:
        pages = tl.load(pages_ptr + offs_n // page_size, mask=offs_n < Lk, other=0).to(tl.int64)
        rows = pages * page_stride + (offs_n % page_size).to(tl.int64) * stride
        return base + rows[:, None] + offs_d[None, :]
    else:
        return ptrs


@triton.jit
def _slope(alibi_ptr, b, h, alibi_bs, HAS_ALIBI: tl.constexpr):
    if HAS_ALIBI:
        return tl.load(alibi_ptr + b * alibi_bs + h).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _forward_block(acc, l_i, m_i, q, qv, k, v, mask_block, offs_m, offs_n, start_n, start_m, span, Lq, Lk, slope,
                   scale, raw_factor, finished_factor, softcap, band_lo, band_hi, dropout_p, keep_scale, seed_lo,
                   seed_hi, base_lo, base_hi, row0, row_length, k_start,
                   SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                   DOT_KIND: tl.constexpr, BLOCK_N: tl.constexpr, FAST_EXP: tl.constexpr,
                   INTERPRETED: tl.constexpr, PRECISE_PV: tl.constexpr, HAS_QV: tl.constexpr):
    """The forward's online softmax over key block offs_n = [start_n, start_n + BLOCK_N), its K and V
    rows and its part of the mask (_mask_block), for queries [start_m, start_m + span) (of each head
    of a stacked tile): (acc, l_i, m_i) moved on. HAS_QV: the scores are q k^T + qv v^T."""
    x = _dot(q, tl.trans(k), DOT_KIND)
    if HAS_QV:
        x += _dot(qv, tl.trans(v), DOT_KIND)
    factor = raw_factor
    # The constexprs first: when one holds, Triton decides the branch while compiling.
    if (SOFTCAP or HAS_ALIBI or MASK_KIND != 0
            or not _block_inside(start_m, span, start_n, BLOCK_N, Lq, Lk, band_lo, band_hi)):
        x, cap = _finish_scores(x * scale, mask_block, offs_m, offs_n, Lq, Lk, slope, softcap, band_lo, band_hi,
                                SOFTCAP, HAS_ALIBI, MASK_KIND)
        factor = finished_factor
    # A row holding NaN takes it, which then reaches o and lse.
    block_max = _row_max_in_units(x, factor, INTERPRETED, FAST_EXP)
    m_new = tl.maximum(m_i, block_max, propagate_nan=tl.PropagateNan.ALL)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: p = 0, alpha = 0
    p = _exp_units(x * factor - m_safe[:, None], FAST_EXP)
    alpha = _exp_units(m_i - m_safe, FAST_EXP)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keeps = _dropout_keeps(offs_m, offs_n, start_n, row0, row_length, k_start, dropout_p, seed_lo, seed_hi,
                               base_lo, base_hi, DROPOUT)
        p = tl.where(keeps, p * keep_scale, 0.0)
    if PRECISE_PV:
        acc = acc * alpha[:, None] + _dot_in_two_parts(p, v, DOT_KIND)
    else:
        acc = acc * alpha[:, None] + _dot(p, v, DOT_KIND)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, alibi_ptr, sinks_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, used_k_ptr,
    pages_ptr, qv_ptr, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, smb, smh, smm, smn, alibi_bs, sob, soh, som, slb,
    slh, sqvb, sqvh, sqvm, H, GROUP, Lq, Lk, D, DV, total_q, total_k, scale, softcap, band_lo, band_hi, dropout_p,
    keep_scale, seed_lo, seed_hi, base_lo, base_hi, heads_per_tile, rows_per_head, head_chunks, splits, split_rows,
    pages_per_sequence, page_size,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, STACKED: tl.constexpr = False, SPLIT: tl.constexpr = False,
    FAST_EXP: tl.constexpr = False, INTERPRETED: tl.constexpr = False, PRECISE_PV: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False, SEQUSED_K: tl.constexpr = False, PAGED: tl.constexpr = 0,
    HAS_QV: tl.constexpr = False,
):
    """Program (query tile and (b, kv head, head chunk) on the first axis, tiles fastest
    (_tile_and_chunk); key split on the third). A tile is BLOCK_M queries of one head
    or, STACKED, rows_per_head queries of each of heads_per_tile heads of one kv head (row r: query
    r % rows_per_head of head h0 + r // rows_per_head), as kernels/cuda/attention_tile.cuh's
    QueryLayout. SPLIT: the tile's key blocks are split over `splits` programs, each writing its
    normalized o and lse in float32 at o_ptr and lse_ptr + split * split_rows (of DV columns each) for
    attention_combine_kernel. PRECISE_PV: P V takes P in two 16-bit parts (_dot_in_two_parts).
    HAS_SINKS: the heads' sinks (sinks_ptr, float32) join lse, here or, SPLIT, in the combine. PAGED
    (1 or 2, _paged_pointers): k and v are a paged cache, key j of sequence b at row j % page_size
    of page pages_ptr[b, j // page_size] (skb and svb the pages' strides). HAS_QV: the scores are
    q k^T + qv v^T, qv_ptr (strides sqvb, sqvh, sqvm) holding each query's DV-wide qv (multi-head
    latent attention's absorbed form): the V tile each block loads for P V serves both."""
    if STACKED:  # rows_per_head 0: as many queries of each head as BLOCK_M holds (an autotuned tile)
        rows_per_head = tl.where(rows_per_head > 0, rows_per_head, BLOCK_M // heads_per_tile)
    tile, chunk = _tile_and_chunk(tl.cdiv(Lq, rows_per_head if STACKED else BLOCK_M))
    c = chunk % head_chunks
    b = chunk // head_chunks // (H // GROUP)
    hk = chunk // head_chunks % (H // GROUP)
    h0 = hk * GROUP + c * heads_per_tile
    q_start, k_start, Lq, Lk, band_lo, band_hi, row_base, head_rows, row_length = _sequence(
        cu_q_ptr, cu_k_ptr, used_k_ptr, b, Lq, Lk, band_lo, band_hi, total_q, total_k, H, VARLEN, SEQUSED_K)
    if STACKED:
        start_m = tile * rows_per_head
        span = rows_per_head
        r = tl.arange(0, BLOCK_M)
        used = (r // rows_per_head < tl.minimum(heads_per_tile, GROUP - c * heads_per_tile)) & (
            start_m + r % rows_per_head < Lq)
        offs_m = tl.where(used, start_m + r % rows_per_head, Lq)  # unused rows: no query
        h_rows = h0 + tl.where(used, r // rows_per_head, 0)
        h = h_rows[:, None]
    else:
        start_m = tile * BLOCK_M
        span = BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        h_rows = h0
        h = h0
    if start_m >= Lq:  # past a packed sequence's end
        return
    # The tile's queries (of each head) inside the sequence: rows past its end are never stored, so a
    # block need not mask them (a decoding sequence's one query in a stacked tile's rows for it).
    span = tl.minimum(span, Lq - start_m)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_in = offs_m[:, None] < Lq
    q = tl.load(q_ptr + b * sqb + h * sqh + (q_start + offs_m[:, None]).to(tl.int64) * sqm + offs_d[None, :],
                mask=row_in & (offs_d[None, :] < D), other=0.0)
    if HAS_QV:
        qv = tl.load(qv_ptr + b * sqvb + h * sqvh + (q_start + offs_m[:, None]).to(tl.int64) * sqvm
                     + offs_dv[None, :], mask=row_in & (offs_dv[None, :] < DV), other=0.0)
    else:
        qv = q
    if PAGED:  # page 0's rows: each block adds its page's offset
        k_base = k_ptr + hk * skh
        v_base = v_ptr + hk * svh
        pages_ptr += b * pages_per_sequence
    else:
        k_base = k_ptr + b * skb + hk * skh + k_start * skn
        v_base = v_ptr + b * svb + hk * svh + k_start * svn
    slope = _slope(alibi_ptr, b, h, alibi_bs, HAS_ALIBI)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    # The key blocks the band of queries [start_m, start_m + span) can reach, less those at either end
    # that the mask hides from all of them; this split's share of them.
    lo = tl.maximum(start_m + band_lo, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + span + band_hi, Lk)
    lo, hi = _shown_keys(lo, hi, offs_m, mask_ptr, b, h, Lq, Lk, smb, smh, smm, smn, MASK_KIND, BLOCK_N)
    if SPLIT:
        per = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), splits) * BLOCK_N
        lo = lo + tl.program_id(2) * per
        hi = tl.minimum(hi, lo + per)
    # m_i, the rows' running maximum, in the exponents' units (_exponent_factors).
    raw_factor, finished_factor = _exponent_factors(scale, FAST_EXP)
    k_ptrs = _row_pointers(k_base, lo + tl.arange(0, BLOCK_N), skn, offs_d)
    v_ptrs = _row_pointers(v_base, lo + tl.arange(0, BLOCK_N), svn, offs_dv)
    # One loop, every block's loads bounded by the keys: with the blocks inside the keys in a loop of
    # their own, loading without the bound, Triton 3.6 (the GPU machine's) spilled the forward at
    # every tuned tile but 128 x 32 (sm_90, bf16, head dim 128: 128 x 64 on 8 warps 182 -> 255
    # registers and 160 bytes of spills, 670 -> 909 instructions a step), for a few percent on 3.8.
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_block = _mask_block(mask_ptr, b, h, offs_m, offs_n, Lq, Lk, smb, smh, smm, smn, MASK_KIND)
        k_ptrs = _paged_pointers(k_ptrs, k_base, pages_ptr, start_n, offs_n, Lk, page_size, skb, skn, offs_d, PAGED)
        v_ptrs = _paged_pointers(v_ptrs, v_base, pages_ptr, start_n, offs_n, Lk, page_size, svb, svn, offs_dv, PAGED)
        k = _load_at(k_ptrs, offs_n, Lk, offs_d, D)
        v = _load_at(v_ptrs, offs_n, Lk, offs_dv, DV)
        acc, l_i, m_i = _forward_block(
            acc, l_i, m_i, q, qv, k, v, mask_block, offs_m, offs_n, start_n, start_m, span, Lq, Lk, slope, scale,
            raw_factor, finished_factor, softcap, band_lo, band_hi, dropout_p, keep_scale, seed_lo, seed_hi, base_lo,
            base_hi, row_base + h * head_rows, row_length, k_start, SOFTCAP, HAS_ALIBI, MASK_KIND, DROPOUT, DOT_KIND,
            BLOCK_N, FAST_EXP, INTERPRETED, PRECISE_PV, HAS_QV)
        k_ptrs += _block_steps(skn, BLOCK_N)
        v_ptrs += _block_steps(svn, BLOCK_N)
    seen = m_i != float("-inf")  # NaN counts as seen
    total = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i * (LN2 if FAST_EXP else 1.0) + log_f32(total), float("-inf"))
    if HAS_SINKS and not SPLIT:
        lse = _lse_with_sink(lse, tl.load(sinks_ptr + h_rows))
        # acc's weights are e^(s - m) (m in natural units): over e^lse.
        factor = exp_f32(tl.where(seen, m_i * (LN2 if FAST_EXP else 1.0) - lse, 0.0))
        o = tl.where(seen[:, None], acc * factor[:, None], 0.0)
    else:
        o = tl.where(seen[:, None], acc / total[:, None], 0.0)
    if SPLIT:
        o_ptr += tl.program_id(2).to(tl.int64) * split_rows * DV
        lse_ptr += tl.program_id(2).to(tl.int64) * split_rows
    o_ptrs = o_ptr + b * sob + h * soh + (q_start + offs_m[:, None]).to(tl.int64) * som + offs_dv[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_in & (offs_dv[None, :] < DV))
    tl.store(lse_ptr + b * slb + h_rows * slh + q_start + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def attention_combine_kernel(part_o_ptr, part_lse_ptr, sinks_ptr, o_ptr, lse_ptr, rows, L, H, DV, sob, soh, som,
                             slb, slh, splits, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
                             HAS_SINKS: tl.constexpr = False):
    """Rows r of the splits' partial results (lse row r at part_lse_ptr + s rows + r, its o at
    part_o_ptr + (s rows + r) DV) merged into o and lse, row r being (b, h, position) of
    (B, H, L): lse = logsumexp_s lse_s (NaN if any is, -inf if all are), with HAS_SINKS head h's
    sink joining it, and o = sum_s exp(lse_s - lse) o_s."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    most = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for s in range(splits):
        part = tl.load(part_lse_ptr + s * rows + r, mask=live, other=float("-inf"))
        most = tl.maximum(most, part, propagate_nan=tl.PropagateNan.ALL)
    seen = most != float("-inf")
    total = tl.zeros((BLOCK_R,), tl.float32)
    for s in range(splits):
        part = tl.load(part_lse_ptr + s * rows + r, mask=live, other=float("-inf"))
        total += tl.where(seen, exp_f32(part - most), 0.0)
    lse = tl.where(seen, most + log_f32(tl.where(seen, total, 1.0)), float("-inf"))
    if HAS_SINKS:
        lse = _lse_with_sink(lse, tl.load(sinks_ptr + (r // L) % H, mask=live, other=float("-inf")))
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = live[:, None] & (offs_dv[None, :] < DV)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), tl.float32)
    for s in range(splits):
        part = tl.load(part_lse_ptr + s * rows + r, mask=live, other=float("-inf"))
        weight = tl.where(seen, exp_f32(part - lse), 0.0)
        o_s = tl.load(part_o_ptr + (s * rows + r[:, None]) * DV + offs_dv[None, :], mask=cols, other=0.0)
        acc += weight[:, None] * o_s
    bh = r // L
    position = r % L
    o_rows = (bh // H) * sob + (bh % H) * soh + position * som
    tl.store(o_ptr + o_rows[:, None] + offs_dv[None, :], acc.to(o_ptr.dtype.element_ty), mask=cols)
    tl.store(lse_ptr + (bh // H) * slb + (bh % H) * slh + position, lse, mask=live)


@triton.jit
def attention_row_deltas_kernel(grad_o_ptr, o_ptr, grad_lse_ptr, delta_ptr, rows, L, H, DV, sgb, sgh, sgm, sob, soh,
                                som, slb, slh, slm, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
                                HAS_GRAD_LSE: tl.constexpr):
    """delta_r = grad_o_r . o_r - grad_lse_r in float32, for rows r = (b, h, position) of (B, H, L),
    delta contiguous; grad_o and o read in their dtypes (head dim contiguous), the products summed
    in float32."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    bh = r // L
    b, h, position = bh // H, bh % H, r % L
    go_rows = b * sgb + h * sgh + position * sgm
    o_rows = b * sob + h * soh + position * som
    offs_dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, DV, BLOCK_DV):
        cols = live[:, None] & (d0 + offs_dv[None, :] < DV)
        go = tl.load(grad_o_ptr + go_rows[:, None] + d0 + offs_dv[None, :], mask=cols, other=0.0)
        o = tl.load(o_ptr + o_rows[:, None] + d0 + offs_dv[None, :], mask=cols, other=0.0)
        acc += tl.sum(go.to(tl.float32) * o.to(tl.float32), axis=1)
    if HAS_GRAD_LSE:
        acc -= tl.load(grad_lse_ptr + b * slb + h * slh + position * slm, mask=live, other=0.0).to(tl.float32)
    tl.store(delta_ptr + r, acc, mask=live)


@triton.jit
def _probs_and_grads(q, k, v, do, lse, delta, mask_block, offs_m, offs_n, start_n, row0, row_length, col0, Lq, Lk,
                     slope, scale, softcap, band_lo, band_hi, dropout_p, keep_scale, seed_lo, seed_hi, base_lo, base_hi,
                     inside,
                     SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
                     DROPOUT: tl.constexpr, DOT_KIND: tl.constexpr, FAST_EXP: tl.constexpr):
    """P after dropout (the weights of V), dS (the gradient of the scores s) and dS times the
    soft-cap's 1 - tanh^2 (the gradient of scale q.k), all [M, N]. mask_block: the block's part of
    the mask (_mask_block). inside: _block_inside's answer for the block (its scores skip the
    masking where they need only scaling)."""
    raw_factor, finished_factor = _exponent_factors(scale, FAST_EXP)
    x = _dot(q, tl.trans(k), DOT_KIND)
    cap = x
    factor = raw_factor
    if SOFTCAP or HAS_ALIBI or MASK_KIND != 0 or not inside:
        x, cap = _finish_scores(x * scale, mask_block, offs_m, offs_n, Lq, Lk, slope, softcap, band_lo, band_hi,
                                SOFTCAP, HAS_ALIBI, MASK_KIND)
        factor = finished_factor
    seen = lse != float("-inf")
    lse_units = tl.where(seen, lse * (LOG2E if FAST_EXP else 1.0), 0.0)
    p = tl.where(seen[:, None], _exp_units(x * factor - lse_units[:, None], FAST_EXP), 0.0)
    dp = _dot(do, tl.trans(v), DOT_KIND)
    if DROPOUT:
        keeps = _dropout_keeps(offs_m, offs_n, start_n, row0, row_length, col0, dropout_p, seed_lo, seed_hi, base_lo,
                               base_hi, DROPOUT)
        p_dropped = tl.where(keeps, p * keep_scale, 0.0)
        dp = tl.where(keeps, dp * keep_scale, 0.0)
    else:
        p_dropped = p
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds_dot = ds * cap
    else:
        ds_dot = ds
    return p_dropped, ds, ds_dot


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def attention_backward_kv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, alibi_ptr, dk_ptr, dv_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
    used_k_ptr,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, slb, slh, sdlb, sdlh,
    smb, smh, smm, smn, alibi_bs, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sdqb, sdqh, sdqm,
    H, HK, GROUP, Lq, Lk, D, DV, total_q, total_k, scale, softcap, band_lo, band_hi, dropout_p, keep_scale,
    seed_lo, seed_hi, base_lo, base_hi,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, FAST_EXP: tl.constexpr = False,
    SEQUSED_K: tl.constexpr = False,
):
    tile, bhk = _tile_and_chunk(tl.cdiv(Lk, BLOCK_N))
    start_n = tile * BLOCK_N
    b = bhk // HK
    hk = bhk % HK
    q_start, k_start, Lq, Lk, band_lo, band_hi, row_base, head_rows, row_length = _sequence(
        cu_q_ptr, cu_k_ptr, used_k_ptr, b, Lq, Lk, band_lo, band_hi, total_q, total_k, H, VARLEN, SEQUSED_K)
    if start_n >= Lk:  # past a packed sequence's end
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(k_ptr + b * skb + hk * skh + k_start * skn, offs_n, Lk, skn, offs_d, D)
    v = _load_rows(v_ptr + b * svb + hk * svh + k_start * svn, offs_n, Lk, svn, offs_dv, DV)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    # The query blocks that can see keys [start_n, start_n + BLOCK_N).
    lo = tl.maximum(start_n - band_hi, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N - band_lo, Lq)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        slope = _slope(alibi_ptr, b, h, alibi_bs, HAS_ALIBI)
        q_base = q_ptr + b * sqb + h * sqh + q_start * sqm
        do_base = do_ptr + b * sdob + h * sdoh + q_start * sdom
        dq_base = dq_ptr + b * sdqb + h * sdqh + q_start * sdqm
        q_ptrs = _row_pointers(q_base, lo + tl.arange(0, BLOCK_M), sqm, offs_d)
        do_ptrs = _row_pointers(do_base, lo + tl.arange(0, BLOCK_M), sdom, offs_dv)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_at(q_ptrs, offs_m, Lq, offs_d, D)
            do = _load_at(do_ptrs, offs_m, Lq, offs_dv, DV)
            q_ptrs += _block_steps(sqm, BLOCK_M)
            do_ptrs += _block_steps(sdom, BLOCK_M)
            lse = tl.load(lse_ptr + b * slb + h * slh + q_start + offs_m, mask=offs_m < Lq, other=float("-inf"))
            delta = tl.load(delta_ptr + b * sdlb + h * sdlh + q_start + offs_m, mask=offs_m < Lq, other=0.0)
            mask_block = _mask_block(mask_ptr, b, h, offs_m, offs_n, Lq, Lk, smb, smh, smm, smn, MASK_KIND)
            p, ds, ds_dot = _probs_and_grads(q, k, v, do, lse, delta, mask_block, offs_m, offs_n, start_n,
                                             row_base + h * head_rows, row_length, k_start, Lq, Lk, slope, scale,
                                             softcap, band_lo, band_hi, dropout_p, keep_scale, seed_lo, seed_hi,
                                             base_lo, base_hi,
                                             _block_inside(start_m, BLOCK_M, start_n, BLOCK_N, Lq, Lk, band_lo,
                                                           band_hi),
                                             SOFTCAP, HAS_ALIBI, MASK_KIND, DROPOUT, DOT_KIND, FAST_EXP)
            dv += _dot(tl.trans(p), do, DOT_KIND)
            dk += _dot(tl.trans(ds_dot), q, DOT_KIND)
            if ATOMIC_DQ:
                dq = _dot(ds_dot, k, DOT_KIND) * scale
                ptrs = dq_base + offs_m[:, None].to(tl.int64) * sdqm + offs_d[None, :]
                tl.atomic_add(ptrs, dq, mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))
    _store_rows(dk_ptr + b * sdkb + hk * sdkh + k_start * sdkn, dk * scale, offs_n, Lk, sdkn, offs_d, D)
    _store_rows(dv_ptr + b * sdvb + hk * sdvh + k_start * sdvn, dv, offs_n, Lk, sdvn, offs_dv, DV)


@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["b_first"])  # one compiled kernel for every chunk
def attention_backward_q_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, alibi_ptr, dq_ptr, ds_ptr, cu_q_ptr, cu_k_ptr,
    used_k_ptr,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, slb, slh, sdlb, sdlh,
    smb, smh, smm, smn, alibi_bs, sdqb, sdqh, sdqm, sdsb, sdsh, sdsm, sdsn,
    H, GROUP, b_first, Lq, Lk, D, DV, total_q, total_k, scale, softcap, band_lo, band_hi, dropout_p, keep_scale,
    seed_lo, seed_hi, base_lo, base_hi,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, WRITE_DS: tl.constexpr, DOT_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, FAST_EXP: tl.constexpr = False,
    SEQUSED_K: tl.constexpr = False,
):
    tile, bh = _tile_and_chunk(tl.cdiv(Lq, BLOCK_M))
    start_m = tile * BLOCK_M
    bh += b_first * H  # dS of batch b at ds_ptr's batch b - b_first
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q_start, k_start, Lq, Lk, band_lo, band_hi, row_base, head_rows, row_length = _sequence(
        cu_q_ptr, cu_k_ptr, used_k_ptr, b, Lq, Lk, band_lo, band_hi, total_q, total_k, H, VARLEN, SEQUSED_K)
    if start_m >= Lq:  # past a packed sequence's end
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(q_ptr + b * sqb + h * sqh + q_start * sqm, offs_m, Lq, sqm, offs_d, D)
    do = _load_rows(do_ptr + b * sdob + h * sdoh + q_start * sdom, offs_m, Lq, sdom, offs_dv, DV)
    lse = tl.load(lse_ptr + b * slb + h * slh + q_start + offs_m, mask=offs_m < Lq, other=float("-inf"))
    delta = tl.load(delta_ptr + b * sdlb + h * sdlh + q_start + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = k_ptr + b * skb + hk * skh + k_start * skn
    v_base = v_ptr + b * svb + hk * svh + k_start * svn
    slope = _slope(alibi_ptr, b, h, alibi_bs, HAS_ALIBI)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo = tl.maximum(start_m + band_lo, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M + band_hi, Lk)
    k_ptrs = _row_pointers(k_base, lo + tl.arange(0, BLOCK_N), skn, offs_d)
    v_ptrs = _row_pointers(v_base, lo + tl.arange(0, BLOCK_N), svn, offs_dv)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_at(k_ptrs, offs_n, Lk, offs_d, D)
        v = _load_at(v_ptrs, offs_n, Lk, offs_dv, DV)
        k_ptrs += _block_steps(skn, BLOCK_N)
        v_ptrs += _block_steps(svn, BLOCK_N)
        mask_block = _mask_block(mask_ptr, b, h, offs_m, offs_n, Lq, Lk, smb, smh, smm, smn, MASK_KIND)
        p, ds, ds_dot = _probs_and_grads(q, k, v, do, lse, delta, mask_block, offs_m, offs_n, start_n,
                                         row_base + h * head_rows, row_length, k_start, Lq, Lk, slope, scale, softcap,
                                         band_lo, band_hi, dropout_p, keep_scale, seed_lo, seed_hi, base_lo, base_hi,
                                         _block_inside(start_m, BLOCK_M, start_n, BLOCK_N, Lq, Lk, band_lo, band_hi),
                                         SOFTCAP, HAS_ALIBI, MASK_KIND, DROPOUT, DOT_KIND, FAST_EXP)
        if WRITE_DS:
            ptrs = (ds_ptr + (b - b_first) * sdsb + h * sdsh + offs_m[:, None].to(tl.int64) * sdsm
                    + offs_n[None, :].to(tl.int64) * sdsn)
            tl.store(ptrs, ds, mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))
        dq += _dot(ds_dot, k, DOT_KIND)
    _store_rows(dq_ptr + b * sdqb + h * sdqh + q_start * sdqm, dq * scale, offs_m, Lq, sdqm, offs_d, D)


# ----------------------------------------------------------------------------------------------------
# Launchers


def _last_contiguous(t):
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _dot_kind(dtype):
    import torch

    return {torch.float16: DOT_F16, torch.bfloat16: DOT_BF16}.get(dtype, DOT_F32)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). On a GPU each kernel is autotuned over these, per
# head-dim bucket (the larger of BLOCK_D and BLOCK_DV), for each combination of head dims, options
# and dtype (the lengths are left out of the key, so that a new length, such as a varlen batch's
# longest sequence, does not tune again); the first of each list is the untuned choice. The
# interpreter runs one small configuration: its cost is per program and step. The forward's key
# blocks of 128 are Hopper's (wgmma's widest N, FlashAttention-3's tile): compiled for sm_90 at head
# dim 128, a 128 x 128 step takes 1116 instructions for four times a 128 x 32 step's work (416),
# counting the code of the blocks that the band or the keys' end cut (636 and 278 without). A
# backward tile of 64 x 64 on 4 warps is Hopper's too: one warpgroup holds 64 rows of each product,
# so that all four take wgmma (the key-block pass, head dim 128: 24 wgmma and 984 instructions a
# step, 18 local loads and 7 stores of spilled registers among them), where on 8 warps the two with
# dK's and dV's rows fell back to mma.sync (64 x 32: 24 wgmma and 32 mma.sync, 425 instructions for
# half the work).
_GPU_BLOCKS = {
    "forward": {64: [(128, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 2), (128, 32, 4, 2), (128, 128, 8, 2)],
                128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (128, 128, 8, 2),
                      (128, 64, 8, 3)],
                256: [(64, 32, 8, 1), (64, 64, 8, 1), (32, 32, 4, 2), (128, 32, 8, 1)],
                512: [(32, 32, 8, 1), (32, 32, 8, 2), (32, 16, 4, 2)]},
    "backward": {64: [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 3)],
                 128: [(64, 32, 8, 2), (64, 64, 8, 1), (32, 64, 4, 2), (32, 32, 4, 2)],
                 256: [(32, 32, 8, 1), (32, 64, 8, 1), (16, 32, 4, 2)],
                 512: [(16, 32, 8, 1), (32, 16, 8, 1)]},
}
# Past head dim 256 (bf16, head dim 512, compiled without a GPU by scripts/triton-attention-sass.py,
# Triton 3.8) these take no local memory on either target and at most 131 KB of shared memory
# (sm_80 has 163 KB); forward tiles of 16 x 32 (sm_80 and sm_90) and 64 x 16 (sm_80), backward ones
# of 16 x 16 and 32 x 32, and the backward's 16 x 32 in two stages, spilled.
# Tried on Hopper GPUs (compute capability 9) only: compiled for sm_80 the backward's 64 x 64 tile
# on 4 warps spills (115 local loads a step of the key-block pass), and so does the forward's 64 x
# 32 at head dim 512 (188), which sm_90 (wgmma's 64 rows) compiles without.
_HOPPER_BLOCKS = {"forward": {512: [(64, 32, 8, 1)]}, "backward": {128: [(64, 64, 4, 2)]}}
# float32 past head dim 256: the 16-bit tiles take up to 200 KB of shared memory there (sm_80 has
# 163 KB) and spill; these take at most 133 KB and no local memory on either target.
_FLOAT32_512_BLOCKS = {"forward": [(16, 16, 4, 2), (16, 16, 8, 1), (32, 16, 8, 1)], "backward": [(16, 16, 8, 1)]}
# 16-bit forwards with qv (HAS_QV) past head dim 256, whose qv tile takes registers beside o's: the
# first 512 tile above, 32 x 32 on 8 warps in one stage, spills in its loop there (160 local loads
# and stores on sm_80, 158 on sm_90, bf16, head dims 64 and 512, Triton 3.8); these take none in it.
_QV_512_BLOCKS = [(32, 32, 8, 2), (32, 16, 4, 2)]
# The interpreter's time goes to Triton's per-operation type checks in Python, nearly whatever a
# block's size: tiles of 32 x 32 ran the tests about three times as fast as 16 x 16 (a quarter of the
# programs and steps), still several tiles of queries and keys at the tests' lengths, the last partial.
_INTERPRETER_BLOCKS = (32, 32, 1, 1)
PAGE_BLOCKS = 128  # a multiple of every BLOCK_N: pages of a multiple of it hold whole key blocks
_TUNING_KEY = ["D", "DV", "SOFTCAP", "HAS_ALIBI", "MASK_KIND", "DROPOUT", "VARLEN", "ATOMIC_DQ", "FAST_EXP",
               "PRECISE_PV", "STACKED", "heads_per_tile", "HAS_QV"]
_tuned_kernels = {}


@functools.lru_cache(maxsize=None)
def _hopper(device):
    """Whether a GPU is a Hopper (compute capability 9), asked once a device: each launch asks."""
    import torch

    return torch.cuda.get_device_capability(device)[0] == 9


def _bucket(dim_pad):
    """The head-dim bucket (64, 128, 256, 512) of a GPU launch whose larger padded head dim is dim_pad."""
    return 64 if dim_pad <= 64 else 128 if dim_pad <= 128 else 256 if dim_pad <= 256 else 512


def _gpu_blocks(backward, bucket, hopper, float32=False, qv=False):
    """The configurations a GPU's kernels are autotuned over for a head-dim bucket (_bucket), of
    float32 inputs or 16-bit ones, and for a forward with qv or without."""
    kind = "backward" if backward else "forward"
    if bucket == 512 and float32:
        return _FLOAT32_512_BLOCKS[kind]
    blocks = _QV_512_BLOCKS if qv and bucket == 512 and not backward else _GPU_BLOCKS[kind][bucket]
    return blocks + (_HOPPER_BLOCKS[kind].get(bucket, []) if hopper else [])


def _tuned(kernel, device, dim_pad, backward, float32=False, qv=False):
    """kernel behind a triton.autotune over the block sizes for its head-dim bucket on a GPU (over
    the first of them alone where GENFAST_TRITON_AUTOTUNE=0, as scripts/gpu-check's Triton tests
    take it: each test's new head dims or options would otherwise time every configuration), over
    the interpreter's one configuration on the CPU; made once per kernel, bucket and choice. A
    launch passes no BLOCK_M, BLOCK_N, num_warps or num_stages, and a grid that reads BLOCK_M or
    BLOCK_N from its meta-parameters. The kernels store their outputs, so the timing runs leave them right, except
    the dQ the backward's key-block kernel adds to with atomics: it is zeroed before each timing run
    and after the last."""
    bucket = 0 if device.type == "cpu" else _bucket(dim_pad)
    untuned = os.environ.get("GENFAST_TRITON_AUTOTUNE") == "0"
    float32 = float32 and bucket == 512  # the one bucket whose tiles depend on the dtype (and qv)
    qv = qv and bucket == 512
    key = (id(kernel), bucket, untuned, bucket != 0 and _hopper(device), float32, qv)
    if key not in _tuned_kernels:
        blocks = ([_INTERPRETER_BLOCKS] if bucket == 0
                  else _gpu_blocks(backward, bucket, _hopper(device), float32, qv))
        if untuned:
            blocks = blocks[:1]  # GENFAST_TRITON_AUTOTUNE=0: the untuned choice, no timing runs
        configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st) for m, n, w, st in blocks]
        reset = ["dq_ptr"] if kernel is attention_backward_kv_kernel else None
        _tuned_kernels[key] = triton.autotune(configs, key=_TUNING_KEY, reset_to_zero=reset)(kernel)
    return _tuned_kernels[key]


def _check(q, k, v, qv=None):
    heads, dim = q.shape[1], q.shape[3]
    kv_heads, v_dim = k.shape[1], v.shape[3]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"attention: the {kv_heads} key heads must divide the {heads} query heads")
    if dim > MAX_HEAD_DIM or v_dim > MAX_HEAD_DIM:
        raise ValueError(f"genfast's Triton attention supports head dims up to {MAX_HEAD_DIM}, got {dim} and {v_dim}")
    if qv is not None and (qv.shape != q.shape[:3] + v.shape[3:] or qv.dtype != q.dtype):
        raise ValueError(f"attention: qv must be q's shape with v's head dim, {tuple(q.shape[:3] + v.shape[3:])}, "
                         f"in q's dtype {q.dtype}; got {qv.dtype} {tuple(qv.shape)}")


class _Packing:
    """The sequences of a call: dense (batch, heads, length, dim) tensors, or packed ones, which the
    launchers view as one batch of (1, heads, total, dim) and the kernels split by cu_seqlens (and
    seqused_k, where given, the keys each sequence uses)."""

    def __init__(self, q, k, varlen):
        self.used_k = self.pages = None
        if varlen is None:
            self.batch, self.lq, self.lk = q.shape[0], q.shape[2], k.shape[2]
            self.cu_q = self.cu_k = q
            self.total_q = self.total_k = 0
        else:
            self.cu_q, self.cu_k, self.lq, self.lk = varlen[:4]
            self.used_k, self.pages = (tuple(varlen[4:]) + (None, None))[:2]
            self.batch = self.cu_q.shape[0] - 1
            self.total_q, self.total_k = q.shape[2], k.shape[2]
        self.varlen = varlen is not None

    def bounds(self):
        """The kernels' cu_q_ptr, cu_k_ptr and used_k_ptr."""
        return self.cu_q, self.cu_k, self.cu_k if self.used_k is None else self.used_k

    def paged_kind(self, page_size):
        """The forward's PAGED: 0 not paged, 1 pages of whole key blocks (every BLOCK_N divides
        PAGE_BLOCKS), 2 any page size."""
        return 0 if self.pages is None else 1 if page_size % PAGE_BLOCKS == 0 else 2

    def page_args(self, k):
        """The forward's pages_ptr (any pointer when not paged), pages_per_sequence and page_size."""
        if self.pages is None:
            return self.cu_k, 0, 0
        return self.pages, self.pages.shape[1], k.shape[2]

    def strides(self, t, keys=False):
        """(batch, head, position) strides: the batch's is 0 for packed sequences; keys of a paged
        cache (pages, heads, page_size, dim) give the pages' stride."""
        return (0 if self.varlen and not (keys and self.pages is not None) else t.stride(0)), t.stride(1), t.stride(2)


def _common(q, k, v, mask, mask_is_bool, alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p, seed, offset,
            packing):
    """Kernel arguments shared by the three kernels: (pointer args, stride args, scalar args, constexprs)."""
    import torch

    # Beyond these the band masks nothing more (a packed sequence's shift included): clamping keeps
    # the arithmetic in 32 bits.
    reach = packing.lq + packing.lk + 1
    band_lo = min(max(int(band_lo), -reach), reach)
    band_hi = min(max(int(band_hi), -reach), reach)
    if mask is None:
        mask_kind, mask_arg, mask_strides = MASK_NONE, q, (0, 0, 0, 0)
    else:
        if mask_is_bool or mask.dtype == torch.bool:
            mask_kind = MASK_BOOL
            mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        else:
            mask_kind, mask_arg = MASK_ADDITIVE, mask
        mask_strides = tuple(mask_arg.stride())
    if alibi_slopes is None:
        alibi_arg, alibi_bs = q, 0
    else:
        alibi_arg = alibi_slopes.to(torch.float32).contiguous()
        alibi_bs = alibi_arg.stride(0) if alibi_arg.dim() == 2 else 0
    dropout_p = float(dropout_p)
    keep_scale = 1.0 / (1.0 - dropout_p) if 0.0 < dropout_p < 1.0 else 0.0
    seed_lo, seed_hi, base_lo, base_hi = philox_key_words(int(seed), int(offset))
    scale = float(scale)
    scalars = dict(total_q=packing.total_q, total_k=packing.total_k, scale=scale, softcap=float(softcap),
                   band_lo=band_lo, band_hi=band_hi, dropout_p=dropout_p, keep_scale=keep_scale, seed_lo=seed_lo,
                   seed_hi=seed_hi, base_lo=base_lo, base_hi=base_hi)
    consts = dict(SOFTCAP=float(softcap) > 0.0, HAS_ALIBI=alibi_slopes is not None, MASK_KIND=mask_kind,
                  DROPOUT=_dropout_kind(dropout_p, packing), VARLEN=packing.varlen, DOT_KIND=_dot_kind(q.dtype),
                  SEQUSED_K=packing.used_k is not None,
                  FAST_EXP=_fast_exp(q.dtype, scale),
                  BLOCK_D=triton.next_power_of_2(max(q.shape[3], 16)),
                  BLOCK_DV=triton.next_power_of_2(max(v.shape[3], 16)))
    return mask_arg, mask_strides, alibi_arg, alibi_bs, scalars, consts


def _fast_exp(dtype, scale):
    """Whether the softmax's exponentials take the GPU's ex2.approx (2 ulp), with the scale folded
    into their base-2 exponents (_exponent_factors): for float16 and bfloat16 inputs and a positive
    scale whose product with log2(e) is finite in float32 (the row maxima are taken before it),
    unless GENFAST_TRITON_FAST_EXP=0 asks for the polynomial (float32 keeps it, whose error its
    tests' error ratio allows). The forward's loop is issue-bound: compiled for sm_90 (bf16, head
    dim 128, 128 x 32 tiles, 8 warps) it took 450 instructions a step with ex2.approx against 956
    with the polynomial, for 10 wgmma, where the H200 ran the polynomial's at 162 TFLOP/s; 431 with
    the scale folded in (and 416 with the pointers stepped, _block_steps)."""
    import torch

    return (os.environ.get("GENFAST_TRITON_FAST_EXP") != "0" and dtype in (torch.float16, torch.bfloat16)
            and 0.0 < scale * LOG2E.value < torch.finfo(torch.float32).max)


def _atomic_dq():
    """GENFAST_TRITON_ATOMIC_DQ=1: the key-block pass adds dQ with atomics, FlashAttention-2's way,
    unless the call is deterministic. Not by default: on an H200 (bf16, head dims 128 and 256) the
    two passes took 28.1, 3.93 and 8.90 ms a forward and backward where atomics took 38.1, 5.61 and
    12.6 (bench/results/20261204-NVIDIA-H200-45ea074)."""
    return os.environ.get("GENFAST_TRITON_ATOMIC_DQ") == "1"


def _packed_stack():
    """Whether packed batches stack a group's heads however long their longest sequence (forward_plan's
    packed rule): not with GENFAST_TRITON_PACKED_STACK=0, which genfast bench times beside it."""
    return os.environ.get("GENFAST_TRITON_PACKED_STACK") != "0"


def _dropout_kind(dropout_p, packing):
    if not dropout_p > 0.0:
        return DROPOUT_NONE
    # A dense row's stream starts at (b H + h) Lq Lk + i Lk; a packed sequence's at any column.
    return DROPOUT_GROUPS if not packing.varlen and packing.lk % 4 == 0 else DROPOUT_ELEMENTS


def _packed(varlen, *tensors):
    """Packed (total, heads, dim) tensors as (1, heads, total, dim) views, lse (heads, total) as
    (1, heads, total), and a paged cache's (pages, page_size, heads, dim) as (pages, heads, page_size,
    dim); dense ones as they are."""
    if varlen is None:
        return tensors
    return tuple(None if t is None else t[None] if t.dim() == 2 else t.transpose(1, 2) if t.dim() == 4
                 else t.transpose(0, 1)[None] for t in tensors)


_STACK_ROWS = 64  # rows of a planned tile that stacks heads, at most
_PACKED_STACK = 16  # heads a packed batch's autotuned tile stacks, at most (BLOCK_M // 16 rows of each)
_PLAN_KEYS = 64  # keys per block in the split rule
_MAX_SPLITS = 128


def forward_plan(batch, heads, kv_heads, lq, lk, multiprocessors, packed=False, max_rows=_STACK_ROWS):
    """(heads_per_tile, splits) of a forward: stack the largest divisor of the group (query heads per
    kv head) whose queries fit a tile of max_rows rows (64, or _planned_rows'), and split the keys
    when the tiles fill less than 80% of two programs per SM, taking the fewest splits whose last
    wave is at least 85% as full as the best count's. Packed sequences (lq their longest) whose
    queries fit no such stack stack the largest divisor up to 16 anyway, a tile holding as many
    queries of each of its heads as it has rows for: lq says nothing of the other sequences, which
    in a batch of decoding beside prefill are mostly one query each, and a tile of one head would
    read a sequence's keys once for each head of the group and fill one of its rows (FlashAttention
    3 packs a group's heads into its tiles for every packed batch, for the same reason). The rule of
    plan_attention_forward (kernels/cuda/attention_forward.cu), which keeps tiles of one head for a
    packed batch where its Hopper forward takes the call, and takes no head dim past 256."""
    group = heads // kv_heads if kv_heads else 1
    stack = 1
    if lq > 0:
        stack = next((d for d in range(min(group, max_rows // lq), 1, -1) if group % d == 0), 1)
        if packed and stack == 1:
            stack = next((d for d in range(min(group, _PACKED_STACK), 1, -1) if group % d == 0), 1)
    rows = min(lq, max_rows // stack) if stack > 1 else max_rows
    tiles = batch * (heads // stack) * triton.cdiv(lq, max(rows, 1))
    key_blocks = triton.cdiv(lk, _PLAN_KEYS)
    slots = 2 * max(multiprocessors, 1)
    if 10 * tiles >= 8 * slots or key_blocks <= 1:
        return stack, 1

    def fill(s):
        waves = tiles * s / slots
        return waves / math.ceil(waves)

    useful = [s for s in range(1, min(_MAX_SPLITS, key_blocks, slots) + 1)
              if s == 1 or triton.cdiv(key_blocks, s) < triton.cdiv(key_blocks, s - 1)]
    best = max(fill(s) for s in useful)
    return stack, next(s for s in useful if fill(s) >= 0.85 * best)


def _planned_rows(dim_pad, qv_beside_wide_float32_q=False):
    """The rows of a planned tile, at most: 64, but 32 past head dim 256, where 64 rows of float32
    take 192 KB of shared memory (sm_80 has 163 KB) and 64 of 16-bit inputs spill on sm_80 (some 25
    registers; 75 stacked); 16 for a float32 qv beside a q past head dim 256 too, whose 32 rows take
    196 KB (16: 131 KB)."""
    return 16 if qv_beside_wide_float32_q else 32 if dim_pad > 256 else _STACK_ROWS


def _planned_qv(consts):
    """(16-bit qv, float32 qv beside a q past head dim 256) of a forward's constexprs, as the planned
    tiles read them."""
    qv, float32 = bool(consts.get("HAS_QV")), consts.get("DOT_KIND") == DOT_F32
    return qv and not float32, qv and float32 and consts["BLOCK_D"] > 256


def _planned_blocks(stacked_rows, dim_pad, interpreted, qv=(False, False)):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a forward with a plan (few tiles, so one
    configuration, not autotuned): a tile of stacked heads holds their stacked_rows queries in at
    least the 16 rows of a dot, up to _planned_rows; a tile of one head (stacked_rows 0) takes that
    many queries. Past head dim 256, on 8 warps with key blocks of 16 in one stage, so that o's rows
    fit the registers and the key blocks the shared memory (compiled for sm_80 and sm_90, 32 rows
    take no local memory and at most 128 KB of shared memory, in float32). qv (_planned_qv): 16-bit
    tiles past head dim 256 take key blocks of 32 in two stages, where those of 16 in one spilled in
    their loop beside the qv tile (at head dims 512 and 512 on sm_80 and sm_90: 314 and 141 local
    loads and stores; none so)."""
    most = _planned_rows(dim_pad, qv[1])
    block_m = (max(16, min(most, triton.next_power_of_2(stacked_rows))) if stacked_rows
               else _INTERPRETER_BLOCKS[0] if interpreted else most)
    if interpreted:
        return block_m, _INTERPRETER_BLOCKS[1], 4, 2
    if dim_pad > 256:
        return (block_m, 32, 8, 2) if qv[0] else (block_m, 16, 8, 1)
    return block_m, 64 if dim_pad <= 128 else 32, 4, 2


def gpu_variants(name, constexprs, ints):
    """The (constexpr overrides, num_warps, num_stages) a GPU launch of kernel `name` takes where the
    interpreter's differ, for genfast.testing.triton_gpu_compile: every autotuned configuration of
    the head-dim bucket (Hopper's too, compiled for each target), or a planned forward's one
    configuration (a stacked tile with rows_per_head 0 is autotuned)."""
    if name in ("attention_combine_kernel", "attention_row_deltas_kernel"):
        return None
    dim_pad = max(constexprs["BLOCK_D"], constexprs["BLOCK_DV"])
    on_gpu = dict(INTERPRETED=False) if "INTERPRETED" in constexprs else {}
    float32 = constexprs.get("DOT_KIND") == DOT_F32
    if constexprs.get("SPLIT") or (constexprs.get("STACKED") and ints.get("rows_per_head")):
        stacked_rows = constexprs["BLOCK_M"] if constexprs["STACKED"] else 0
        block_m, block_n, warps, stages = _planned_blocks(stacked_rows, dim_pad, False, _planned_qv(constexprs))
        return [(dict(BLOCK_M=block_m, BLOCK_N=block_n, **on_gpu), warps, stages)]
    blocks = _gpu_blocks("backward" in name, _bucket(dim_pad), True, float32, constexprs.get("HAS_QV", False))
    # A stacked tile's configurations named apart, so that each compiles (its rows' head pointers take
    # registers that the same tile of one head does not).
    stacked = dict(STACKED=True) if constexprs.get("STACKED") else {}
    return [(dict(BLOCK_M=m, BLOCK_N=n, **stacked, **on_gpu), w, st) for m, n, w, st in blocks]


def _multiprocessors(device):
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def launch_attention_forward(q, k, v, mask, mask_is_bool, alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p,
                             seed, offset, o, lse, wrap=None, varlen=None, plan=None, sinks=None, qv=None):
    """o (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32 (preallocated, written) of q (B, H,
    Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv) (float32 or float16; Hk divides H). mask: None or
    an expanded (B, H, Lq, Lk) view, uint8/bool (mask_is_bool: keep where nonzero) or float32,
    float16 or bfloat16 (added); alibi_slopes None, (H,) or (B, H); softcap 0: none; band_lo/band_hi: keep
    i + band_lo <= j <= i + band_hi, +-(1 << 62) unbounded; dropout with the Philox stream of
    (seed, offset). wrap: torch.library.wrap_triton inside a triton_op. varlen: packed sequences
    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k[, seqused_k]), q (total_q, H, D), k and v
    (total_k, Hk, D[v]), o (total_q, H, Dv), lse (H, total_q); the band is then relative to each
    sequence's bottom-right diagonal (kernels/common/attention.h); seqused_k (int32 (batch,) or None):
    the keys each sequence uses, the first of its rows; then block_table (int32 (batch, pages per
    sequence), contiguous, or None): k and v are a paged cache (pages, page_size, Hk, D[v]), page_size
    at least 1, and cu_seqlens_k gives the sequences' key counts alone. plan: (heads_per_tile,
    splits), forward_plan's for the device when None; (1, 1) runs the autotuned tiles of one head, and
    so does a plan of one split stacking more queries than a planned tile's 64 rows (up to 16 heads,
    BLOCK_M // heads_per_tile queries of each).
    sinks: None or the heads' sink logits, float32 (H,) contiguous. qv: None or q's shape with v's
    head dim, in q's dtype: the scores are q k^T + qv v^T."""
    import torch

    q, k, v, o, lse, qv = _packed(varlen, q, k, v, o, lse, qv)
    _check(q, k, v, qv)
    packing = _Packing(q, k, varlen)
    heads, dim = q.shape[1], q.shape[3]
    kv_heads, v_dim = k.shape[1], v.shape[3]
    batch, lq, lk = packing.batch, packing.lq, packing.lk
    if batch * heads * lq == 0:
        return
    if lk == 0:
        o.zero_()
        if sinks is None:
            lse.fill_(float("-inf"))
        else:
            lse.copy_(sinks.view(1, heads, 1).expand(lse.shape))
        return
    q, k, v, qv = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v), _last_contiguous(qv)
    mask_arg, ms, alibi_arg, alibi_bs, scalars, consts = _common(q, k, v, mask, mask_is_bool, alibi_slopes, scale,
                                                                 softcap, band_lo, band_hi, dropout_p, seed, offset,
                                                                 packing)
    out = o if o.stride(-1) == 1 else o.new_empty(o.shape)
    lse_out = lse if lse.stride(-1) == 1 else lse.new_empty(lse.shape)
    group = heads // kv_heads
    dim_pad = max(consts["BLOCK_D"], consts["BLOCK_DV"])
    float32 = consts["DOT_KIND"] == DOT_F32
    planned_qv = _planned_qv(dict(consts, HAS_QV=qv is not None))
    most = _planned_rows(dim_pad, planned_qv[1])
    stack, splits = plan or forward_plan(batch, heads, kv_heads, lq, lk, _multiprocessors(q.device),
                                         packing.varlen and _packed_stack(), most)
    if not (1 <= stack <= min(group, most) and 1 <= splits <= _MAX_SPLITS):
        raise ValueError(f"attention: plan {(stack, splits)} needs 1 <= heads per tile <= {min(group, most)} "
                         f"and 1 <= splits <= {_MAX_SPLITS}")

    pages_arg, pages_per_sequence, page_size = packing.page_args(k)

    def args(o_arg, lse_arg):
        return (q, k, v, mask_arg, alibi_arg, q if sinks is None else sinks, o_arg, lse_arg, *packing.bounds(),
                pages_arg, q if qv is None else qv, *packing.strides(q), *packing.strides(k, keys=True),
                *packing.strides(v, keys=True), ms[0], ms[1], ms[2], ms[3], alibi_bs, *packing.strides(o_arg),
                *packing.strides(lse_arg)[:2], *((0, 0, 0) if qv is None else packing.strides(qv)), heads, group, lq,
                lk, dim, v_dim)

    # A float32 o of 16-bit inputs is a mask gradient's (its delta, rowsum(dO o), would otherwise
    # carry P's rounding to 16 bits, which the gradient's sum over a broadcast mask gathers).
    consts = dict(consts, INTERPRETED=q.device.type == "cpu",
                  PRECISE_PV=o.dtype == torch.float32 and consts["DOT_KIND"] != DOT_F32, HAS_SINKS=sinks is not None,
                  PAGED=packing.paged_kind(page_size), HAS_QV=qv is not None)
    scalars = dict(scalars, pages_per_sequence=pages_per_sequence, page_size=page_size)
    head_chunks = triton.cdiv(group, stack)
    if splits == 1 and (stack == 1 or stack * lq > most and stack <= _PACKED_STACK):
        # Autotuned tiles: of one head, or (a packed batch's plan) stacking each of `stack` heads'
        # BLOCK_M // stack queries (rows_per_head 0).
        kernel = _tuned(attention_forward_kernel, q.device, dim_pad, False, float32, qv is not None)
        kernel = kernel if wrap is None else wrap(kernel)
        kernel[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"] // stack) * batch * kv_heads * head_chunks,)](
            *args(out, lse_out), heads_per_tile=stack, rows_per_head=0, head_chunks=head_chunks, splits=1,
            split_rows=0, **scalars, **consts, STACKED=stack > 1)
    else:
        interpreted = q.device.type == "cpu"
        block_m, block_n, warps, stages = _planned_blocks(stack * lq if stack > 1 else 0, dim_pad, interpreted,
                                                          planned_qv)
        rows_per_head = min(lq, block_m // stack) if stack > 1 else block_m
        grid = (triton.cdiv(lq, rows_per_head) * batch * kv_heads * head_chunks, 1, splits)
        meta = dict(heads_per_tile=stack, rows_per_head=rows_per_head, head_chunks=head_chunks, splits=splits,
                    **scalars, **consts, BLOCK_M=block_m, BLOCK_N=block_n, STACKED=stack > 1, SPLIT=splits > 1,
                    **({} if interpreted else dict(num_warps=warps, num_stages=stages)))
        kernel = attention_forward_kernel if wrap is None else wrap(attention_forward_kernel)
        if splits == 1:
            kernel[grid](*args(out, lse_out), split_rows=0, **meta)
        else:
            part_o = torch.empty((splits, *out.shape), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((splits, *lse_out.shape), dtype=torch.float32, device=q.device)
            rows = part_lse[0].numel()
            kernel[grid](*args(part_o[0], part_lse[0]), split_rows=rows, **meta)
            combine = attention_combine_kernel if wrap is None else wrap(attention_combine_kernel)
            block_r = 16
            combine[(triton.cdiv(rows, block_r),)](
                part_o, part_lse, q if sinks is None else sinks, out, lse_out, rows, out.shape[2], heads, v_dim,
                *packing.strides(out), *packing.strides(lse_out)[:2], splits, BLOCK_R=block_r,
                BLOCK_DV=consts["BLOCK_DV"], HAS_SINKS=sinks is not None)
    if out is not o:
        o.copy_(out)
    if lse_out is not lse:
        lse.copy_(lse_out)


def launch_attention_row_deltas(grad_o, o, grad_lse, delta, varlen=None, wrap=None):
    """The backward's delta = rowsum(grad_o * o) - grad_lse (no grad_lse: 0) into delta, float32
    contiguous in lse's layout: grad_o and o (B, H, Lq, Dv), grad_lse and delta (B, H, Lq); with
    varlen (as launch_attention_forward's), grad_o and o (total_q, H, Dv), grad_lse and delta (H,
    total_q). Neither grad_o nor o is copied or widened (torch's (grad_o.float() * o.float()).sum(-1)
    makes three float32 tensors of o's size)."""
    import torch

    grad_o, o, grad_lse, delta = _packed(varlen, grad_o, o, grad_lse, delta)
    if not delta.is_contiguous() or delta.dtype != torch.float32:
        raise ValueError("launch_attention_row_deltas: delta must be float32 and contiguous")
    rows, v_dim = delta.numel(), o.shape[3]
    if rows == 0:
        return
    grad_o, o = _last_contiguous(grad_o), _last_contiguous(o)
    block_dv = max(16, min(triton.next_power_of_2(v_dim), 128))
    block_r = 32 if o.device.type == "cpu" else 4096 // block_dv
    kernel = attention_row_deltas_kernel if wrap is None else wrap(attention_row_deltas_kernel)
    lse_strides = (0, 0, 0) if grad_lse is None else grad_lse.stride()
    kernel[(triton.cdiv(rows, block_r),)](
        grad_o, o, delta if grad_lse is None else grad_lse, delta, rows, o.shape[2], o.shape[1], v_dim,
        *grad_o.stride()[:3], *o.stride()[:3], *lse_strides, BLOCK_R=block_r, BLOCK_DV=block_dv,
        HAS_GRAD_LSE=grad_lse is not None)


def launch_attention_backward(grad_o, delta, q, k, v, lse, mask, mask_is_bool, alibi_slopes, scale, softcap, band_lo,
                              band_hi, dropout_p, seed, offset, grad_q, grad_k, grad_v, grad_s, wrap=None,
                              varlen=None, deterministic=False):
    """The gradients of launch_attention_forward for grad_o (B, H, Lq, Dv) and delta = rowsum(grad_o
    * o) - grad_lse (B, H, Lq) float32: grad_q (like q), grad_k, grad_v (like k, v), float32,
    written (grad_q zero-initialized by the caller unless deterministic: dQ is added to it). grad_s
    None, or float32 zero-initialized by the caller, (B, H, Lq, Lk) with 1 for each of B, H and Lq
    that a mask broadcasts over: dS, the gradient of the scores s (before the soft-cap's chain rule;
    the additive mask's gradient) summed over those dims, where the band reaches (0 elsewhere).
    Summed dS is computed in chunks of whole batches, each in a (batches, H, Lq, Lk) buffer added to
    grad_s in batch order: MASK_GRAD_CHUNK_FLOATS or grad_s's size, whichever is larger, bounds the
    buffer (one batch at least). dQ from its own pass, no atomics; or, where _atomic_dq() and
    neither deterministic nor grad_s, added by the key-block pass with atomics (bits may vary from
    run to run on a GPU). varlen:
    as launch_attention_forward's, delta in lse's layout."""
    grad_o, delta, q, k, v, lse, grad_q, grad_k, grad_v = _packed(varlen, grad_o, delta, q, k, v, lse, grad_q, grad_k,
                                                                  grad_v)
    _check(q, k, v)
    packing = _Packing(q, k, varlen)
    heads, dim = q.shape[1], q.shape[3]
    kv_heads, v_dim = k.shape[1], v.shape[3]
    batch, lq, lk = packing.batch, packing.lq, packing.lk
    if batch * heads * lq == 0 or lk == 0:
        grad_q.zero_()
        grad_k.zero_()
        grad_v.zero_()
        return
    q, k, v, grad_o = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v), _last_contiguous(grad_o)
    lse, delta = _last_contiguous(lse), _last_contiguous(delta)
    mask_arg, ms, alibi_arg, alibi_bs, scalars, consts = _common(q, k, v, mask, mask_is_bool, alibi_slopes, scale,
                                                                 softcap, band_lo, band_hi, dropout_p, seed, offset,
                                                                 packing)
    outs = [t if t.stride(-1) == 1 else t.new_zeros(t.shape) for t in (grad_q, grad_k, grad_v)]
    dq, dk, dv = outs
    atomic_dq = not deterministic and grad_s is None and _atomic_dq()
    dim_pad = max(consts["BLOCK_D"], consts["BLOCK_DV"])
    common_strides = (*packing.strides(q), *packing.strides(k), *packing.strides(v), *packing.strides(grad_o),
                      *packing.strides(lse)[:2], *packing.strides(delta)[:2], ms[0], ms[1], ms[2], ms[3], alibi_bs)
    float32 = consts["DOT_KIND"] == DOT_F32
    kv_kernel = _tuned(attention_backward_kv_kernel, q.device, dim_pad, True, float32)
    kv_kernel = kv_kernel if wrap is None else wrap(kv_kernel)
    kv_kernel[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]) * batch * kv_heads,)](
        q, k, v, grad_o, lse, delta, mask_arg, alibi_arg, dk, dv, dq, *packing.bounds(), *common_strides,
        *packing.strides(dk), *packing.strides(dv), *packing.strides(dq),
        heads, kv_heads, heads // kv_heads, lq, lk, dim, v_dim, **scalars, **consts,
        ATOMIC_DQ=atomic_dq,
    )
    if not atomic_dq:
        q_kernel = _tuned(attention_backward_q_kernel, q.device, dim_pad, True, float32)
        q_kernel = q_kernel if wrap is None else wrap(q_kernel)

        def dq_pass(ds, b_first, batches):
            q_kernel[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]) * batches * heads,)](
                q, k, v, grad_o, lse, delta, mask_arg, alibi_arg, dq, dq if ds is None else ds, *packing.bounds(),
                *common_strides, *packing.strides(dq), *(ds.stride() if ds is not None else (0,) * 4),
                heads, heads // kv_heads, b_first, lq, lk, dim, v_dim, **scalars, **consts,
                WRITE_DS=ds is not None,
            )

        if grad_s is None or tuple(grad_s.shape) == (batch, heads, lq, lk):
            dq_pass(grad_s, 0, batch)
        else:
            chunk = min(batch, max(1, max(MASK_GRAD_CHUNK_FLOATS, grad_s.numel()) // (heads * lq * lk)))
            buffer = grad_s.new_empty(chunk, heads, lq, lk)
            for b_first in range(0, batch, chunk):
                ds = buffer[:min(chunk, batch - b_first)].zero_()
                dq_pass(ds, b_first, ds.shape[0])
                target = grad_s[b_first:b_first + ds.shape[0]] if grad_s.shape[0] == batch else grad_s
                target += ds.sum_to_size(target.shape)
    for out, given in zip(outs, (grad_q, grad_k, grad_v)):
        if out is not given:
            given.copy_(out)
