"""A KV cache's new rows, written in place in one pass: the keys (and the queries) turned by a
rotary embedding, then the keys and values stored at each sequence's next rows of a padded or a
paged cache. The step before attention in decoding (flash_attn_with_kvcache's append; vLLM's
rotary embedding and reshape_and_cache), fused instead of a rotation's half-dozen elementwise ops
and an indexed copy per tensor. genfast.reference.attention_kvcache.kvcache_append defines it."""

from typing import Optional

import torch

from . import _backend, _checks
from .ops import kvcache_append as kvcache_op
from .ops.attention import check_paged_cache
from .reference import attention_kvcache as reference

Tensor = torch.Tensor


def check_index(name, t, batch, device):
    """An int32 (batch,) tensor on the inputs' device: cache_seqlens, cache_batch_idx, cache_leftpad."""
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or tuple(t.shape) != (batch,) or t.device != device:
        raise ValueError(f"{name} must be an int32 tensor (batch,) = ({batch},) on the inputs' device ({device}), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
                         f"{' on ' + str(t.device) if isinstance(t, Tensor) else ''}")


def _check(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin, q, impl):
    """Raises on bad input, naming the argument, before anything is written."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if k.dtype not in _checks.FLOAT_DTYPES and not (impl == "reference" and k.dtype == torch.float64):
        raise TypeError(f"k must be float32, float16 or bfloat16 (float64 with impl='reference'), got {k.dtype}")
    batch, new_rows, kv_heads, head_dim = k.shape
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be (batch, seqlen_new, kv_heads, v_dim) with k's {tuple(k.shape[:3])}, got "
                         f"{tuple(v.shape)}")
    for name, t, dim in (("k_cache", k_cache, head_dim), ("v_cache", v_cache, v.shape[3])):
        if t.shape[2:] != (kv_heads, dim) or t.stride(3) != 1:
            raise ValueError(f"{name} must be (rows, row_length, kv_heads, dim) = (*, *, {kv_heads}, {dim}) with "
                             f"contiguous features, got {tuple(t.shape)} strides {t.stride()}")
    if k_cache.shape[:2] != v_cache.shape[:2]:
        raise ValueError(f"k_cache and v_cache must have the same rows, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("rotary_cos", rotary_cos),
                    ("rotary_sin", rotary_sin), ("q", q)):
        if t is not None and (t.dtype != k.dtype or t.device != k.device):
            raise ValueError(f"{name} must have k's dtype and device ({k.dtype}, {k.device}), got {t.dtype}, "
                             f"{t.device}")
    check_index("cache_seqlens", cache_seqlens, batch, k.device)
    if cache_batch_idx is not None:
        check_index("cache_batch_idx", cache_batch_idx, batch, k.device)
        if block_table is not None:
            raise ValueError("cache_batch_idx indexes a padded cache; a paged cache has block_table instead")
    if block_table is not None:
        check_paged_cache(block_table, k_cache, v_cache, batch, 0, 0.0)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin go together")
    if rotary_cos is not None and (rotary_cos.dim() != 2 or rotary_sin.shape != rotary_cos.shape
                                   or 2 * rotary_cos.shape[1] > head_dim):
        raise ValueError(f"rotary_cos and rotary_sin must be (positions, rotary_dim / 2) with rotary_dim <= head_dim "
                         f"({head_dim}), got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (k_cache, v_cache, k, v, rotary_cos, rotary_sin, q)):
        raise ValueError("kvcache_append serves inference and has no backward: call it under torch.no_grad(), or "
                         "with inputs that do not require grad")
    if q is not None:
        if rotary_cos is None:
            raise ValueError("q is turned by the rotary embedding: pass rotary_cos and rotary_sin")
        if q.dim() != 4 or q.shape[0] != batch or q.shape[3] != head_dim:
            raise ValueError(f"q must be (batch, seqlen_q, heads, head_dim) = ({batch}, *, *, {head_dim}), got "
                             f"{tuple(q.shape)}")


def _check_rows(k_cache, k, cache_seqlens, block_table, rotary_cos, q, queries_in_sequence):
    """On the CPU: each sequence's new rows fit its cache and the rotary tables (the native op checks
    this itself, with the pages and cache rows named; a GPU would synchronise)."""
    batch, new_rows = k.shape[:2]
    if k.device.type == "cpu" and batch > 0 and not torch.compiler.is_compiling():
        capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
        held = cache_seqlens.long()
        if bool((held < 0).any()) or int(held.max()) + new_rows > capacity:
            raise ValueError(f"cache_seqlens + seqlen_new must lie in 0 .. {capacity}, the cache's keys per sequence; "
                             f"got up to {int(held.max()) + new_rows}")
        turned = max(new_rows, (q.shape[1] if queries_in_sequence else min(q.shape[1], 1)) if q is not None else 0)
        if rotary_cos is not None and int(held.max()) + turned > rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos and rotary_sin have {rotary_cos.shape[0]} positions, fewer than the "
                             f"{int(held.max()) + turned} the rows turned need")


def kvcache_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor, *,
                   cache_batch_idx: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                   rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                   rotary_interleaved: bool = True, q: Optional[Tensor] = None, queries_in_sequence: bool = True,
                   impl: str = "auto") -> Optional[Tensor]:
    """Writes k (batch, seqlen_new, kv_heads, head_dim) and v (..., v_dim) into k_cache and v_cache
    in place, at rows cache_seqlens[n] + i (int32 (batch,)) of sequence n: of row cache_batch_idx[n]
    (default n) of a padded cache (rows, capacity, kv_heads, dim), or through block_table (int32
    (batch, pages per sequence)) of a paged cache (pages, page_size, kv_heads, dim). With rotary_cos
    and rotary_sin (positions, rotary_dim / 2; k's dtype) k is turned at its positions first
    (rotary_interleaved: planes (2m, 2m + 1), else GPT-NeoX's (m, m + rotary_dim / 2)), and q
    (batch, seqlen_q, heads, head_dim), if given, is returned turned at cache_seqlens[n] + i
    (queries_in_sequence) or at cache_seqlens[n]. No host-device synchronisation; the CPU checks the
    rows fit, a GPU does not. For inference: no gradient."""
    _check(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin, q, impl)
    backend = _backend.resolve_impl(impl, k.device)
    if backend != "native":
        _check_rows(k_cache, k, cache_seqlens, block_table, rotary_cos, q, queries_in_sequence)
    if backend == "reference":
        return reference.kvcache_append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=cache_batch_idx,
                                        block_table=block_table, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                        rotary_interleaved=rotary_interleaved, q=q,
                                        queries_in_sequence=queries_in_sequence)
    q_out = None if q is None else torch.empty_like(q, memory_format=torch.contiguous_format)
    kvcache_op.run(backend, k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin,
                   bool(rotary_interleaved), q, bool(queries_in_sequence), k_cache, v_cache, q_out)
    return q_out
