"""A KV cache's new rows in Triton (kernels/common/kvcache_append.h): one program per new row (its
keys turned by the rotary tables and written with its values) or per query row (turned)."""

import triton
import triton.language as tl


@triton.jit
def _turned(x_ptr, cos_ptr, sin_ptr, position, half, table_rows, j, inside, ROTARY: tl.constexpr,
            INTERLEAVED: tl.constexpr):
    """Features j of the head row at x_ptr, turned at `position` (float32); a position outside the
    tables (not checked on a GPU) turns by nothing, as in FlashAttention and the CUDA kernel."""
    x = tl.load(x_ptr + j, mask=inside, other=0.0).to(tl.float32)
    if ROTARY:
        if INTERLEAVED:
            plane, first, partner = j // 2, j % 2 == 0, j ^ 1
        else:
            first = j < half
            plane = tl.where(first, j, j - half)
            partner = tl.where(first, j + half, j - half)
        turns = inside & (j < 2 * half) & (position >= 0) & (position < table_rows)
        c = tl.load(cos_ptr + position * half + plane, mask=turns, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + position * half + plane, mask=turns, other=0.0).to(tl.float32)
        other = tl.load(x_ptr + partner, mask=turns, other=0.0).to(tl.float32)
        # (x1, x2) -> (x1 c - x2 s, x1 s + x2 c), x1 the plane's first feature
        x = tl.where(turns, tl.where(first, x * c - other * s, other * s + x * c), x)
    return x


@triton.jit
def kvcache_append_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, seqlens_ptr, batch_idx_ptr, table_ptr, cos_ptr,
                          sin_ptr, q_ptr, q_out_ptr, new_rows, kv_heads, head_dim, v_dim, key_rows, q_rows, q_heads,
                          k_stride_0, k_stride_1, k_stride_2, v_stride_0, v_stride_1, v_stride_2, table_width,
                          page_size, half, table_rows, PAGED: tl.constexpr, BATCH_IDX: tl.constexpr,
                          ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, QUERIES_IN_SEQUENCE: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    task = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_D)
    if task < key_rows:
        n = task // new_rows
        row = task % new_rows
        position = tl.load(seqlens_ptr + n).to(tl.int64) + row
        if PAGED:
            page = tl.load(table_ptr + n * table_width + position // page_size).to(tl.int64)
            first, second = page, position % page_size
        else:
            if BATCH_IDX:
                first = tl.load(batch_idx_ptr + n).to(tl.int64)
            else:
                first = n
            second = position
        key_row = k_cache_ptr + first * k_stride_0 + second * k_stride_1
        value_row = v_cache_ptr + first * v_stride_0 + second * v_stride_1
        jv = tl.arange(0, BLOCK_V)
        for h in range(kv_heads):
            key = _turned(k_ptr + (task * kv_heads + h) * head_dim, cos_ptr, sin_ptr, position, half, table_rows, j,
                          j < head_dim, ROTARY, INTERLEAVED)
            tl.store(key_row + h * k_stride_2 + j, key.to(k_cache_ptr.dtype.element_ty), mask=j < head_dim)
            value = tl.load(v_ptr + (task * kv_heads + h) * v_dim + jv, mask=jv < v_dim)
            tl.store(value_row + h * v_stride_2 + jv, value, mask=jv < v_dim)
    else:
        q_task = task - key_rows
        n = q_task // q_rows
        position = tl.load(seqlens_ptr + n).to(tl.int64)
        if QUERIES_IN_SEQUENCE:
            position += q_task % q_rows
        for h in range(q_heads):
            offset = (q_task * q_heads + h) * head_dim
            query = _turned(q_ptr + offset, cos_ptr, sin_ptr, position, half, table_rows, j, j < head_dim, ROTARY,
                            INTERLEAVED)
            tl.store(q_out_ptr + offset + j, query.to(q_out_ptr.dtype.element_ty), mask=j < head_dim)


def launch_kvcache_append(k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, rotary_cos,
                          rotary_sin, rotary_interleaved, q, queries_in_sequence, q_out):
    """k, v, q, q_out, the tables and indices contiguous; the caches with contiguous features."""
    batch, new_rows, kv_heads, head_dim = k.shape
    key_rows = batch * new_rows
    q_rows, q_heads = (q.shape[1], q.shape[2]) if q is not None else (0, 0)
    programs = key_rows + batch * q_rows
    if programs == 0:
        return
    rotary = rotary_cos is not None
    kvcache_append_kernel[(programs,)](
        k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx if cache_batch_idx is not None else cache_seqlens,
        block_table if block_table is not None else cache_seqlens, rotary_cos if rotary else k,
        rotary_sin if rotary else k, q if q is not None else k, q_out if q_out is not None else k, new_rows, kv_heads,
        head_dim, v.shape[3], key_rows, q_rows, q_heads, *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_table.shape[1] if block_table is not None else 0, k_cache.shape[1],
        rotary_cos.shape[1] if rotary else 0, rotary_cos.shape[0] if rotary else 0, PAGED=block_table is not None,
        BATCH_IDX=cache_batch_idx is not None, ROTARY=rotary, INTERLEAVED=bool(rotary_interleaved),
        QUERIES_IN_SEQUENCE=bool(queries_in_sequence),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_V=triton.next_power_of_2(v.shape[3]))
