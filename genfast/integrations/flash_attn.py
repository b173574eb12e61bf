"""FlashAttention 2's functions (flash_attn.flash_attn_interface) on genfast's kernels, for code
written against them: change the import and nothing else,

    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    from genfast.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

and it runs where FlashAttention does not: on the CPU, in float32, with head dims it lacks, or
with genfast's Triton kernels (impl="triton", a keyword FlashAttention does not have). The arguments,
layouts and semantics are FlashAttention 2's: q (batch, seqlen, heads, head_dim), grouped-query
heads, causal masks and windows aligned to the bottom-right corner, softcap, ALiBi slopes, dropout,
deterministic backward, block_table for a paged KV cache. flash_attn_with_kvcache writes the new
keys and values into the cache in place, rotated by the rotary tables when given, and attends
(genfast.reference.attention_kvcache defines it). The rotary embedding functions of
flash_attn.layers.rotary (apply_rotary_emb, its in-place qkv and kv forms, RotaryEmbedding) come from
genfast.integrations.flash_attn_rotary, on genfast.rotary; the padding helpers of
flash_attn.bert_padding (unpad_input, pad_input) from genfast.integrations.flash_attn_padding.

Where genfast differs, on purpose:
- softmax_lse is -inf for a row that masks every key (its log-sum-exp; FlashAttention writes +inf);
- return_attn_probs returns (out, softmax_lse, an empty tensor): the probabilities are never
  materialized (FlashAttention returns them only for testing, and with dropout only); with dropout
  it raises;
- dropout draws from genfast's Philox stream, keyed by torch's default generator: the same
  distribution, other masks;
- num_splits, a scheduling hint of FlashAttention's, is accepted and ignored.
Not supported (it raises, as FlashAttention does): cache_leftpad with block_table.
"""

import torch
import torch.nn.functional as F

from ..attention import attention_varlen
from ..kvcache import check_index, kvcache_append
from .flash_attn_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input
from .flash_attn_rotary import (RotaryEmbedding, apply_rotary, apply_rotary_emb, apply_rotary_emb_func,
                                apply_rotary_emb_kv_, apply_rotary_emb_qkv_)

Tensor = torch.Tensor

__all__ = ["RotaryEmbedding", "apply_rotary", "apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_kv_",
           "apply_rotary_emb_qkv_", "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_with_kvcache", "index_first_axis", "index_put_first_axis", "pad_input", "unpad_input"]


def _options(causal, window_size, softcap) -> dict:
    """FlashAttention's causal flag, window_size and softcap as attention_varlen's options."""
    left, right = window_size
    return dict(causal="bottom_right" if causal else None,
                window=None if (left, right) == (-1, -1) else (int(left), int(right)),
                softcap=float(softcap) if softcap is not None and softcap > 0 else None)  # FlashAttention's


def _turns_queries_in_sequence(causal, window_size, chunk, left_reach, right_reach) -> bool:
    """Whether FlashAttention turns a cache call's queries at their own positions (where the call is
    causal or local) rather than all at the first: its window counts as local only after it drops a
    left side of at least left_reach and a right side of at least right_reach (FlashAttention 2:
    the cache's keys for both; 3: one less than the keys, one less than the queries)."""
    left, right = window_size
    return bool(causal or chunk or 0 <= left < left_reach or 0 <= right < right_reach)


def _finish(o, lse, return_attn_probs, dropout_p):
    if not return_attn_probs:
        return o
    if dropout_p > 0.0:
        raise NotImplementedError("return_attn_probs with dropout_p > 0: genfast never materializes the attention "
                                  "probabilities or the dropout pattern")
    return o, lse, o.new_empty(0)


def _uniform_cu_seqlens(batch: int, length: int, device) -> Tensor:
    """cu_seqlens of `batch` sequences of `length` rows each."""
    return torch.arange(batch + 1, device=device, dtype=torch.int32) * length


def _batch_major(lse, batch, lq):
    """attention_varlen's lse (heads, batch lq) as FlashAttention's (batch, heads, lq), contiguous."""
    return lse.view(lse.shape[0], batch, lq).transpose(0, 1).contiguous()


def _check_dense(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a tensor (batch, seqlen, heads, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"q, k and v must have one batch size, got {q.shape[0]}, {k.shape[0]} and {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have one seqlen, got {k.shape[1]} and {v.shape[1]}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, impl: str = "auto"):
    """out (batch, seqlen_q, heads, head_dim_v) of q (batch, seqlen_q, heads, head_dim) over k and v
    (batch, seqlen_k, kv_heads, head_dim[_v]); with return_attn_probs also softmax_lse (batch, heads,
    seqlen_q). Runs as attention_varlen over the batch's rows, which reads q, k and v and writes out
    in this layout without a copy."""
    _check_dense(q, k, v)
    batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    cu_q = _uniform_cu_seqlens(batch, lq, q.device)
    cu_k = cu_q if lk == lq else _uniform_cu_seqlens(batch, lk, q.device)
    o, lse = attention_varlen(q.reshape(batch * lq, *q.shape[2:]), k.reshape(batch * lk, *k.shape[2:]),
                              v.reshape(batch * lk, *v.shape[2:]), cu_q, cu_k, lq, lk, dropout_p, softmax_scale,
                              alibi_slopes=alibi_slopes, deterministic=deterministic, return_lse=True, impl=impl,
                              **_options(causal, window_size, softcap))
    o = o.view(batch, lq, *o.shape[1:])
    lse = _batch_major(lse, batch, lq) if return_attn_probs else None
    return _finish(o, lse, return_attn_probs, dropout_p)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              impl: str = "auto"):
    """flash_attn_func of qkv (batch, seqlen, 3, heads, head_dim)."""
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, impl=impl)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             impl: str = "auto"):
    """flash_attn_func of q and kv (batch, seqlen_k, 2, kv_heads, head_dim)."""
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, impl=impl)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, impl: str = "auto"):
    """out (total_q, heads, head_dim_v) of sequences packed without padding: genfast.attention_varlen,
    causal from each sequence's bottom-right corner; softmax_lse (heads, total_q) with
    return_attn_probs. block_table: k and v are a paged cache (pages, page_size, kv_heads, head_dim)."""
    o, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                              softmax_scale, alibi_slopes=alibi_slopes, deterministic=deterministic, return_lse=True,
                              impl=impl, block_table=block_table, **_options(causal, window_size, softcap))
    return _finish(o, lse, return_attn_probs, dropout_p)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, impl: str = "auto"):
    """flash_attn_varlen_func of qkv (total, 3, heads, head_dim)."""
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  impl=impl)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    impl: str = "auto"):
    """flash_attn_varlen_func of q and kv (total_k, 2, kv_heads, head_dim)."""
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, impl=impl)


def _index_vector(name, t, batch, device) -> Tensor:
    """t as int32 (FlashAttention's dtype; int64 is taken too), checked as kvcache_append checks it."""
    if isinstance(t, Tensor) and t.dtype == torch.int64:
        t = t.to(torch.int32)
    check_index(name, t, batch, device)
    return t


def _check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, cache_batch_idx, cache_leftpad, block_table):
    """FlashAttention's rules; kvcache_append and attention_varlen check the rest, before anything is written."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if (k is None) != (v is None):
        raise ValueError("k and v go together: pass both new keys and new values, or neither")
    if k is not None and (k.dim() != 4 or k.shape[0] != q.shape[0]):
        raise ValueError(f"k must be (batch, seqlen_new, kv_heads, head_dim) with q's batch {q.shape[0]}, got "
                         f"{tuple(k.shape)}")
    if rotary_cos is not None and k is None:
        raise ValueError("rotary_cos and rotary_sin rotate the new keys: pass k and v too, as FlashAttention needs")
    if cache_leftpad is not None and block_table is not None:
        raise NotImplementedError("cache_leftpad with block_table (a paged cache) is not supported")
    if cache_batch_idx is not None and block_table is not None:
        raise ValueError("cache_batch_idx indexes a padded cache; a paged cache has block_table instead")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            impl: str = "auto"):
    """out (batch, seqlen_q, heads, head_dim_v), and softmax_lse (batch, heads, seqlen_q) with
    return_softmax_lse: q over the cache's keys, after k and v (when given) are written into
    k_cache and v_cache in place at rows cache_seqlens[n] .. (reference.attention_kvcache). A padded
    cache is read as attention_varlen's seqused_k (the cache's rows flattened); a paged cache
    through block_table; a padded cache with cache_batch_idx, or sliced from longer rows, as pages
    of a whole row each, and with cache_leftpad as pages of one key (each sequence's keys start
    within its row; a sliced cache is then copied). No host-device synchronisation: the rows
    written and read are computed on q's device."""
    _check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, cache_batch_idx, cache_leftpad, block_table)
    batch, lq = q.shape[0], q.shape[1]
    held, cache_batch_idx = _cache_rows(batch, q.device, k_cache, k, cache_seqlens, cache_batch_idx, block_table)
    options = _options(causal, window_size, softcap)
    capacity = _cache_capacity(k_cache, block_table)
    q, held = _append_to_cache(q, k_cache, v_cache, k, v, held, cache_batch_idx, block_table, rotary_cos, rotary_sin,
                               rotary_interleaved,
                               _turns_queries_in_sequence(causal, window_size, 0, capacity, capacity), impl)
    common = dict(scale=softmax_scale, alibi_slopes=alibi_slopes, return_lse=True, impl=impl, **options)
    o, lse = _attend_to_cache(q.reshape(batch * lq, *q.shape[2:]), _uniform_cu_seqlens(batch, lq, q.device), lq,
                              k_cache, v_cache, held, cache_batch_idx, cache_leftpad, block_table, common)
    o = o.view(batch, lq, *o.shape[1:])
    return (o, _batch_major(lse, batch, lq)) if return_softmax_lse else o


def _cache_capacity(k_cache, block_table) -> int:
    """The keys a sequence's share of the cache holds: its row, or its pages."""
    page_size = k_cache.shape[1]
    if isinstance(block_table, Tensor) and block_table.dim() == 2:
        return block_table.shape[1] * page_size
    return page_size


def _cache_rows(batch, device, k_cache, k, cache_seqlens, cache_batch_idx, block_table):
    """cache_seqlens (an int, a tensor, or None: the whole cache) as an int32 (batch,) tensor, and
    cache_batch_idx checked."""
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is needed to append k and v: the count of keys each sequence holds")
        held = torch.full((batch,), _cache_capacity(k_cache, block_table), device=device, dtype=torch.int32)
    elif isinstance(cache_seqlens, int):
        held = torch.full((batch,), cache_seqlens, device=device, dtype=torch.int32)
    else:
        held = _index_vector("cache_seqlens", cache_seqlens, batch, device)
    if cache_batch_idx is not None:
        cache_batch_idx = _index_vector("cache_batch_idx", cache_batch_idx, batch, device)
    return held, cache_batch_idx


def _append_to_cache(q, k_cache, v_cache, k, v, held, cache_batch_idx, block_table, rotary_cos, rotary_sin,
                     rotary_interleaved, queries_in_sequence, impl):
    """Writes k and v (when given) into the caches after the `held` keys, turned by the rotary
    tables (and q with them); returns q and the counts of keys held after."""
    if k is None:
        return q, held
    turned = kvcache_append(k_cache, v_cache, k, v, held, cache_batch_idx=cache_batch_idx, block_table=block_table,
                            rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
                            q=None if rotary_cos is None else q, queries_in_sequence=queries_in_sequence, impl=impl)
    return (q if turned is None else turned), held + k.shape[1]


def _cache_row_indices(batch, device, cache_batch_idx):
    """Each sequence's row of a padded cache: cache_batch_idx, or its own."""
    return torch.arange(batch, device=device, dtype=torch.int32) if cache_batch_idx is None else cache_batch_idx


def _attend_to_cache(flat_q, cu_q, max_q, k_cache, v_cache, held, cache_batch_idx, cache_leftpad, block_table,
                     common):
    """attention_varlen of the queries flat_q (sequence n at rows cu_q[n] ..) over the first held[n]
    keys of each sequence's share of the cache: (o, lse (heads, rows))."""
    batch, device = held.shape[0], held.device
    capacity = _cache_capacity(k_cache, block_table)
    # A padded cache's rows flatten without a copy unless the cache is a slice of longer rows.
    flat = all(t.shape[0] <= 1 or t.shape[1] <= 1 or t.stride(0) == t.shape[1] * t.stride(1)
               for t in (k_cache, v_cache))
    if block_table is None and cache_batch_idx is None and cache_leftpad is None and flat:
        return attention_varlen(flat_q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), cu_q,
                                _uniform_cu_seqlens(batch, capacity, device), max_q, capacity, seqused_k=held,
                                **common)
    pages, table = (k_cache, v_cache), block_table
    if cache_leftpad is not None:
        # Each sequence's keys from its own row: pages of one row, a row-by-row table.
        start = _index_vector("cache_leftpad", cache_leftpad, batch, device)
        first = _cache_row_indices(batch, device, cache_batch_idx) * capacity + start
        table = first[:, None] + torch.arange(capacity, device=device, dtype=torch.int32)
        table = table.clamp_(max=k_cache.shape[0] * capacity - 1)  # rows past a sequence's keys: never read
        pages, held = (k_cache.flatten(0, 1)[:, None], v_cache.flatten(0, 1)[:, None]), held - start
    elif block_table is None:  # a padded cache's rows as pages of `capacity` keys, read in place
        table = _cache_row_indices(batch, device, cache_batch_idx)[:, None]
    cu_k = F.pad(held.cumsum(0, dtype=torch.int32), (1, 0))
    return attention_varlen(flat_q, *pages, cu_q, cu_k, max_q, capacity, block_table=table, **common)
