"""Attention over a KV cache that the call extends in place, in plain PyTorch: the definition of
flash_attn_with_kvcache, which genfast.integrations.flash_attn implements on genfast's kernels.

q (B, Lq, Hq, D). The caches hold each sequence's keys and values by rows:
- padded: k_cache (B_cache, capacity, Hk, D), v_cache (B_cache, capacity, Hk, Dv); sequence n's key
  j at [cache_batch_idx[n], j] (cache_batch_idx defaults to n);
- paged (block_table (B, pages per sequence)): k_cache (pages, page_size, Hk, D); sequence n's key j
  at [block_table[n, j // page_size], j % page_size].
Sequence n holds keys cache_leftpad[n] .. cache_seqlens[n] - 1 (cache_leftpad defaults to 0).

With new keys k (B, Lnew, Hk, D) and values v (B, Lnew, Hk, Dv), their row i is written at key
cache_seqlens[n] + i, k rotated there first when rotary tables are given (reference.rotary); the
sequence then holds Lnew more keys. The queries turn too (rotary tables need new keys): query i at
cache_seqlens[n] + i when the call is causal or windowed, else all at cache_seqlens[n]
(FlashAttention's rule). Then each sequence's queries
attend its keys as reference.attention does with causal="bottom_right" and the window
bottom-right aligned (the queries are the last Lq positions).
"""

from typing import Optional, Tuple

import torch

from .attention import attention
from .rotary import rotary

Tensor = torch.Tensor


def _key_rows(n: int, keys: Tensor, cache_batch_idx: Optional[Tensor], block_table: Optional[Tensor],
              page_size: int) -> Tuple[Tensor, Tensor]:
    """The cache index pair (first dim, second dim) of sequence n's keys `keys`."""
    if block_table is not None:
        return block_table[n, keys // page_size].long(), keys % page_size
    row = n if cache_batch_idx is None else int(cache_batch_idx[n])
    return torch.full_like(keys, row), keys


def kvcache_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor, *,
                   cache_batch_idx: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                   rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                   rotary_interleaved: bool = True, q: Optional[Tensor] = None,
                   queries_in_sequence: bool = True) -> Optional[Tensor]:
    """Writes k (rotated when rotary tables are given) and v into the caches at each sequence's
    rows cache_seqlens[n] + i; returns q rotated at cache_seqlens[n] + i (queries_in_sequence) or
    cache_seqlens[n] (None without q)."""
    page_size = k_cache.shape[1]
    turned = []
    for n in range(k.shape[0]):
        held = int(cache_seqlens[n])
        new = torch.arange(held, held + k.shape[1], device=k.device)
        k_new = k[n] if rotary_cos is None else rotary(k[n], rotary_cos, rotary_sin, new, rotary_interleaved)
        rows = _key_rows(n, new, cache_batch_idx, block_table, page_size)
        k_cache[rows] = k_new.to(k_cache.dtype)
        v_cache[rows] = v[n].to(v_cache.dtype)
        if q is not None:
            positions = torch.arange(held, held + q.shape[1], device=q.device) if queries_in_sequence \
                else torch.full((q.shape[1],), held, device=q.device)
            turned.append(rotary(q[n], rotary_cos, rotary_sin, positions, rotary_interleaved))
    if q is None:
        return None
    return torch.stack(turned) if turned else q.clone()


def kvcache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                      v: Optional[Tensor] = None, *, cache_seqlens: Tensor, cache_batch_idx: Optional[Tensor] = None,
                      cache_leftpad: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                      rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                      rotary_interleaved: bool = True, scale: Optional[float] = None, causal: bool = False,
                      window: Optional[Tuple[int, int]] = None, softcap: Optional[float] = None,
                      alibi_slopes: Optional[Tensor] = None, return_lse: bool = False):
    """o (B, Lq, Hq, Dv), and lse (B, Hq, Lq) with return_lse; writes k and v into the caches."""
    batch, lq = q.shape[:2]
    local = window is not None and tuple(window) != (-1, -1)
    held = cache_seqlens.long()
    if k is not None:
        turned = kvcache_append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=cache_batch_idx,
                                block_table=block_table, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                rotary_interleaved=rotary_interleaved, q=None if rotary_cos is None else q,
                                queries_in_sequence=causal or local)
        q = q if turned is None else turned
        held = held + k.shape[1]
    outputs, lses = [], []
    for n in range(batch):
        start = 0 if cache_leftpad is None else int(cache_leftpad[n])
        rows = _key_rows(n, torch.arange(start, int(held[n]), device=q.device), cache_batch_idx, block_table,
                         k_cache.shape[1])
        keys, values = (cache[rows].transpose(0, 1)[None] for cache in (k_cache, v_cache))
        slopes = alibi_slopes[n] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        result = attention(q[n].transpose(0, 1)[None], keys, values, scale=scale, enable_gqa=True,
                           causal="bottom_right" if causal else None, window=window if local else None,
                           alibi_slopes=slopes, softcap=softcap, return_lse=return_lse)
        o, lse = result if return_lse else (result, None)
        outputs.append(o[0].transpose(0, 1))
        lses.append(lse)
    o = torch.stack(outputs) if outputs else q.new_zeros(0, lq, q.shape[2], v_cache.shape[-1])
    if not return_lse:
        return o
    return o, torch.cat(lses) if lses else q.new_zeros(0, q.shape[2], lq, dtype=torch.float32)
