"""FlashAttention 3's functions (the flash_attn_interface module of its hopper/ package) on
genfast's kernels, for code written against them: change the import and nothing else,

    from flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    from genfast.integrations.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, ...

and it runs where FlashAttention 3 does not: before Hopper, on the CPU, in float32, with genfast's
Triton kernels (impl="triton", a keyword FlashAttention does not have). The signatures and returns
are those of FlashAttention 3 since it took return_attn_probs: out alone, or (out, softmax_lse);
flash_attn_with_kvcache returns (out, softmax_lse, out_accum, softmax_lse_accum) with
return_softmax_lse, the last two empty (genfast combines its splits itself). Layouts and semantics
are FlashAttention 2's (genfast.integrations.flash_attn): q (batch, seqlen, heads, head_dim),
grouped-query heads, causal masks and windows aligned to the bottom-right corner, softcap, a paged
cache through page_table; and FlashAttention 3's own:
- seqused_q and seqused_k: sequence n uses only its first seqused_q[n] queries and seqused_k[n]
  keys, aligned to each other's last; the rows past seqused_q get out 0 and softmax_lse -inf
  (FlashAttention 3 leaves them unwritten) and pass no gradient. max_seqlen_q and max_seqlen_k
  bound the counts used, max(seqused_q) and max(seqused_k) as there, or the rows;
- attention_chunk (Llama 4's chunked attention): a query at bottom-right position p sees only the
  keys of its own chunk, [p - p mod chunk, .. + chunk), as well as its window (none when p < 0).
  Computed exactly as attention over each chunk's queries and keys packed as sequences of their
  own, so it has a backward (FlashAttention 3's has none); with a KV cache, each chunk's keys read
  in place through a block table (a paged cache's pages where the chunk holds whole pages);
- qv (multi-head latent attention's absorbed form): the scores q k^T + qv v^T, softmax_scale by
  default (head_dim + head_dim_v) ** -0.5 (genfast.attention_varlen's qv). Without gradients the
  CPU's forward and, on a GPU, Triton's read qv and the cache in place, head dims up to 512 each
  on a GPU (DeepSeek's 64 + 512 decode so); a call asking for gradients (which qv gets too;
  FlashAttention 3 gives it none) computes attention of cat(q, qv) over cat(k, v), a copy of both
  (with a KV cache, of the caches, each call), whose head dim head_dim + head_dim_v Triton takes up
  to 512 (past it, "auto" runs the reference, unfused);
- flash_attn_with_kvcache's cu_seqlens_q (queries packed without padding) and cu_seqlens_k_new
  (new keys and values packed so, written by indexed copies), rotary_seqlens and page_table;
- fp8: float8_e4m3fn q, k, v (and qv, and a cache of it) with q_descale, k_descale and v_descale,
  float32 (batch, kv_heads) (None: 1): the scores scale (q qd)(k kd)^T [+ (qv qd)(v vd)^T] and out
  P (v vd), in bfloat16, as FlashAttention 3's fp8 kernels compute them; no backward (nor has
  FlashAttention 3's). genfast's kernels take no fp8: the call is widened to bfloat16 on a GPU
  (float32 on the CPU), k and v exactly (a copy, of the whole cache with one), q and qv with their
  rows' descales folded in, vd applied to out. Descales beside other dtypes are ignored, as there;
- flash_attn_combine merges attentions over parts of the keys by their log-sum-exps.
A row that sees no key gets softmax_lse -inf (FlashAttention 3 writes +inf). num_splits,
pack_gqa, sm_margin and scheduler_metadata are scheduling hints: accepted, ignored;
get_scheduler_metadata returns None. Not supported (each raises, naming it): cache_leftpad with
page_table (as in FlashAttention 2); rotary tables over an fp8 cache.
"""

import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from ..attention import attention_varlen
from ..attention_merge import merge_attention
from ..ops.attention import check_qv
from ..rotary import rotary
from .float8 import wide_dtype
from .flash_attn import (_append_to_cache, _attend_to_cache, _batch_major, _cache_capacity, _cache_rows,
                         _cache_row_indices, _check_dense, _check_kvcache, _index_vector, _options,
                         _turns_queries_in_sequence, _uniform_cu_seqlens)

Tensor = torch.Tensor

__all__ = ["flash_attn_combine", "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_with_kvcache", "get_scheduler_metadata"]


FP8 = torch.float8_e4m3fn  # FlashAttention 3's fp8 input dtype


def _descale(name, t, batch, kv_heads, device):
    """A descale as FlashAttention 3 takes it: float32 (batch, kv_heads), any strides; None is 1."""
    if t is None:
        return torch.ones(batch, kv_heads, device=device)
    if not isinstance(t, Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (batch, kv_heads) \
            or t.device != device:
        raise ValueError(f"{name} must be a float32 tensor (batch, kv_heads) = ({batch}, {kv_heads}) on q's device "
                         f"({device}), got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
                         f"{' on ' + str(t.device) if isinstance(t, Tensor) else ''}")
    return t


def _fp8_descales(q, k, v, qv, descales, batch, names=("q", "k", "v", "qv")):
    """The checked descales (qd, kd, vd), float32 (batch, kv_heads), of a call of float8_e4m3fn q, k,
    v (and qv) with FlashAttention 3's q_descale, k_descale and v_descale (each None for 1); None for
    a call of other dtypes, whose descales FlashAttention 3 ignores, and so does genfast. Raises,
    naming the argument (`names`: how the call names q, k, v and qv), before anything is written."""
    given = dict(zip(names, (q, k, v, qv)))
    if q.dtype != FP8:
        for name, t in list(given.items())[1:]:
            if t is not None and t.dtype == FP8:
                raise ValueError(f"{name} is float8_e4m3fn: {names[0]} must be too (with its q_descale), got "
                                 f"{q.dtype}")
        return None
    for name, t in list(given.items())[1:]:
        if t is not None and t.dtype != FP8:
            raise ValueError(f"with float8_e4m3fn {names[0]}, {name} must be float8_e4m3fn too, got {t.dtype}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, qv)):
        raise NotImplementedError("fp8 attention has no backward (nor has FlashAttention 3's): call it under "
                                  "torch.no_grad()")
    kv_heads = k.shape[-2]
    if kv_heads == 0 or q.shape[-2] % kv_heads:
        raise ValueError(f"{names[0]}'s {q.shape[-2]} heads must be a multiple of {names[1]}'s {kv_heads}")
    return tuple(_descale(name, t, batch, kv_heads, q.device)
                 for name, t in zip(("q_descale", "k_descale", "v_descale"), descales))


def _fp8_widened(q, k, v, qv, scales, cu_q):
    """A call of float8_e4m3fn q, k, v (and qv) with its checked descales `scales` (_fp8_descales;
    None: not fp8, returned as it is), whose scores are scale (q qd)(k kd)^T [+ (qv qd)(v vd)^T] and
    out P (v vd), as a call genfast's kernels run: (q, k, v, qv, out_scale (rows, heads, 1)). q's
    and qv's rows (sequence n at cu_q[n] ..) take their sequence's qd kd and qd vd, k and v are
    widened exactly (a copy, of the whole cache where they are one), and out_scale carries vd: so a
    page that sequences of different descales share is read right. Widened to bfloat16 (the out
    dtype of FlashAttention 3's fp8 calls) on a GPU, to float32 on the CPU, whose kernels compute in
    it."""
    if scales is None:
        return q, k, v, qv, None
    qd, kd, vd = scales
    sequence, _ = _row_sequences(cu_q, q.shape[0])
    group = q.shape[-2] // k.shape[-2]

    def per_row(scale):  # (batch, kv_heads) -> (rows, heads, 1)
        return scale.repeat_interleave(group, 1)[sequence][..., None]

    wide = wide_dtype(q.device)
    q = (q.float() * per_row(qd * kd)).to(wide)
    qv = None if qv is None else (qv.float() * per_row(qd * vd)).to(wide)
    return q, k.to(wide), v.to(wide), qv, per_row(vd)


def _fp8_out(o, out_scale):
    """out of a widened fp8 call (_fp8_widened) times vd, in bfloat16 as FlashAttention 3's."""
    return o if out_scale is None else (o.float() * out_scale).to(torch.bfloat16)


def _check_chunk(attention_chunk) -> int:
    if isinstance(attention_chunk, bool) or not isinstance(attention_chunk, numbers.Integral) or attention_chunk < 0:
        raise ValueError(f"attention_chunk must be an int >= 0 (0: no chunks), got {attention_chunk!r}")
    return int(attention_chunk)


def _index_tensor(name, t, shape, device):
    """t as an int32 tensor of `shape` on `device`, else an error naming it."""
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or tuple(t.shape) != shape or t.device != device:
        raise ValueError(f"{name} must be an int32 tensor {shape} on q's device ({device}), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
                         f"{' on ' + str(t.device) if isinstance(t, Tensor) else ''}")
    return t


def _held(name, used, rows):
    """seqused_q or seqused_k, each at most its sequence's rows (checked on the CPU, where that costs
    no synchronisation; a GPU takes the smaller)."""
    if used is None:
        return rows
    if used.device.type == "cpu" and used.numel() and not torch.compiler.is_compiling():
        over = torch.nonzero(used > rows)
        if over.numel():
            n = int(over[0, 0])
            raise ValueError(f"{name}[{n}] = {int(used[n])} exceeds sequence {n}'s {int(rows[n])} rows")
    return torch.minimum(used, rows)


def _chunk_parts(held_q, held_k, chunk, before, max_k):
    """Each sequence's parts under attention_chunk, (first_q, first_key, keys), each (batch, parts):
    where the part's queries start among the sequence's held_q, its first key and its count of the
    held_k keys. Part c holds the queries whose bottom-right position p = i + held_k - held_q lies
    in chunk c, [c chunk, (c + 1) chunk), and chunk c's keys: none for the chunks before key 0 (p <
    0), of which there are enough for `before` queries (a bound the caller knows: no such chunk
    where no sequence has more queries than keys). Each part's bottom-right alignment is then the
    whole sequence's, and it holds at most `chunk` queries. (The CPU kernels share a batch's
    (sequence, head, block) tasks out in contiguous runs: parts of no queries in front would leave
    one thread the work.)"""
    ahead = -(-before // chunk)
    starts = torch.arange(-ahead, max(1, -(-max_k // chunk)), device=held_q.device, dtype=torch.int32) * chunk
    first_q = torch.minimum((starts - (held_k - held_q)[:, None]).clamp(min=0), held_q[:, None])
    keys = torch.where(starts < 0, 0, (held_k[:, None] - starts).clamp(0, chunk))
    return first_q, starts.clamp(min=0).expand_as(keys), keys


def _starts(cu, first):
    """cu_seqlens of the parts that start at rows first (batch, parts) of each sequence of cu."""
    return torch.cat(((cu[:-1, None] + first).flatten(), cu[-1:]))


def _subsequences(cu_q, cu_k, held_q, unused_rows, used_k, chunk, before, max_k):
    """cu_seqlens_q, cu_seqlens_k and seqused_k of the sequences genfast attends over in place of
    FlashAttention 3's: each sequence's parts under attention_chunk (_chunk_parts) of its held_q
    queries (_held's), then, with unused_rows (seqused_q given), its rows past them as a sequence of
    no keys. Computed on the device: no synchronisation."""
    rows_k = cu_k[1:] - cu_k[:-1]
    held_k = _held("seqused_k", used_k, rows_k)
    if chunk:
        first_q, first_key, keys = _chunk_parts(held_q, held_k, chunk, before, max_k)
        first_k = torch.minimum(first_key, rows_k[:, None])
    else:
        first_q = first_k = torch.zeros_like(held_q)[:, None]
        keys = held_k[:, None]
    if unused_rows:  # a sequence of no keys
        first_q = torch.cat((first_q, held_q[:, None]), 1)
        first_k = torch.cat((first_k, rows_k[:, None]), 1)
        keys = torch.cat((keys, torch.zeros_like(keys[:, :1])), 1)
    return _starts(cu_q, first_q), _starts(cu_k, first_k), keys.flatten()


def _chunked_cache_attention(flat_q, cu_q, max_q, k_cache, v_cache, held, cache_batch_idx, cache_leftpad,
                             page_table, chunk, common):
    """attention_chunk over a KV cache: each sequence's parts (_chunk_parts) as sequences of their
    own, whose keys a block table finds: a paged cache's pages where the chunk holds whole pages,
    else the cache's rows as pages of one key (key a of sequence n: row cache_leftpad[n] + a of its
    cache row, or of its pages). cache_leftpad: int32, checked."""
    batch, device = held.shape[0], held.device
    capacity = _cache_capacity(k_cache, page_table)
    start = torch.zeros_like(held) if cache_leftpad is None else cache_leftpad
    first_q, first_key, keys = _chunk_parts(cu_q[1:] - cu_q[:-1], held - start, chunk, max_q, capacity)
    cu_k = F.pad(keys.flatten().cumsum(0, dtype=torch.int32), (1, 0))
    page_size = k_cache.shape[1]
    if page_table is not None and chunk % page_size == 0:
        pages = (first_key[..., None] // page_size + torch.arange(chunk // page_size, device=device))
        table = torch.gather(page_table, 1, pages.clamp(max=page_table.shape[1] - 1).flatten(1)).view_as(pages)
        pools = k_cache, v_cache
    else:
        key = (first_key[..., None] + torch.arange(chunk, device=device)).clamp(max=capacity - 1)
        if page_table is not None:
            pages = torch.gather(page_table, 1, (key // page_size).flatten(1)).view_as(key)
            table = pages * page_size + key % page_size
        else:
            first = _cache_row_indices(batch, device, cache_batch_idx) * capacity + start
            table = (first[:, None, None] + key).clamp(max=k_cache.shape[0] * capacity - 1)
        pools = k_cache.flatten(0, 1)[:, None], v_cache.flatten(0, 1)[:, None]
    return attention_varlen(flat_q, *pools, _starts(cu_q, first_q), cu_k, min(max_q, chunk), min(chunk, capacity),
                            block_table=table.flatten(0, 1).to(torch.int32), **common)


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, used_q, used_k, softmax_scale, causal, qv, descales, window_size,
            attention_chunk, softcap, deterministic, impl, before=None):
    """(o, lse (heads, rows)) of packed sequences with FlashAttention 3's options, fp8 inputs with
    their descales among them; `before` bounds a sequence's queries before its key 0 (max_q when
    None)."""
    batch = cu_q.shape[0] - 1 if isinstance(cu_q, Tensor) and cu_q.dim() == 1 else -1
    scales = _fp8_descales(q, k, v, qv, descales, batch)
    if scales is not None:
        _index_tensor("cu_seqlens_q", cu_q, (max(batch, 0) + 1,), q.device)
    q, k, v, qv, out_scale = _fp8_widened(q, k, v, qv, scales, cu_q)
    o, lse = _packed_attention(q, k, v, cu_q, cu_k, max_q, max_k, used_q, used_k, softmax_scale, causal, qv,
                               window_size, attention_chunk, softcap, deterministic, impl, before)
    return _fp8_out(o, out_scale), lse


def _packed_attention(q, k, v, cu_q, cu_k, max_q, max_k, used_q, used_k, softmax_scale, causal, qv, window_size,
                      attention_chunk, softcap, deterministic, impl, before):
    chunk = _check_chunk(attention_chunk)
    common = dict(scale=softmax_scale, deterministic=deterministic, return_lse=True, impl=impl,
                  qv=qv, **_options(causal, window_size, softcap))
    if not chunk and used_q is None and used_k is None:
        return attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **common)
    batch = cu_q.shape[0] - 1 if isinstance(cu_q, Tensor) and cu_q.dim() == 1 else -1
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        _index_tensor(name, t, (max(batch, 0) + 1,), q.device)
    if not chunk and used_q is None:
        return attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k,
                                seqused_k=_held("seqused_k", used_k, cu_k[1:] - cu_k[:-1]), **common)
    rows_q = cu_q[1:] - cu_q[:-1]
    held_q = _held("seqused_q", used_q, rows_q)
    sub_q, sub_k, keys = _subsequences(cu_q, cu_k, held_q, used_q is not None, used_k, chunk,
                                       max_q if before is None else before, max_k)
    parts_k = min(max_k, chunk) if chunk else max_k
    if used_q is None:  # a chunk's part holds at most `chunk` queries
        return attention_varlen(q, k, v, sub_q, sub_k, min(max_q, chunk) if chunk else max_q, parts_k,
                                seqused_k=keys, **common)
    o, lse = attention_varlen(q, k, v, sub_q, sub_k, _unused_rows_bound(q, rows_q, held_q, max_q), parts_k,
                              seqused_k=keys, **common)
    return _rows_past_used_cleared(o, lse, cu_q, held_q)


def _unused_rows_bound(q, rows_q, held_q, max_q):
    """max_seqlen_q for the sequences of the rows past seqused_q (rows_q - held_q of them) beside the
    parts of the rows used. FlashAttention 3 takes max(seqused_q) for max_seqlen_q, which need not
    bound them: on the CPU (where reading the counts costs no synchronisation) their largest count,
    under torch.compile all of q's rows; on a GPU max_q, the kernels leaving any rows past it
    unwritten, as FlashAttention 3 leaves all of them (_rows_past_used_cleared clears them); at least
    1 there, as the CUDA kernels take no 0 while q has rows (every seqused_q 0)."""
    if q.device.type != "cpu":
        return max(max_q, 1)
    if torch.compiler.is_compiling():
        return max(max_q, q.shape[0])
    return max(max_q, int((rows_q - held_q).max()) if rows_q.numel() else 0)


def _rows_past_used_cleared(o, lse, cu_q, held_q):
    """o 0 and lse -inf in each sequence's rows past held_q, which see no key (a GPU may have left
    them unwritten: _unused_rows_bound), and in any rows past the last sequence."""
    if held_q.numel() == 0:
        return torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    sequence, i = _row_sequences(cu_q, o.shape[0])
    used = i < held_q[sequence]
    return torch.where(used[:, None, None], o, 0), torch.where(used, lse, float("-inf"))


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                    v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                    pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False, *,
                    impl: str = "auto"):
    """out (batch, seqlen_q, heads, head_dim_v) of q (batch, seqlen_q, heads, head_dim) over k and v
    (batch, seqlen_k, kv_heads, head_dim[_v]); with return_attn_probs (out, softmax_lse (batch,
    heads, seqlen_q))."""
    _check_dense(q, k, v)
    check_qv(qv, q, v)
    chunk = _check_chunk(attention_chunk)
    batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    cu_q = _uniform_cu_seqlens(batch, lq, q.device)
    cu_k = cu_q if lk == lq else _uniform_cu_seqlens(batch, lk, q.device)
    flat = [None if t is None else t.reshape(batch * t.shape[1], *t.shape[2:]) for t in (q, k, v, qv)]
    o, lse = _varlen(*flat[:3], cu_q, cu_k, lq, lk, None, None, softmax_scale, causal, flat[3],
                     (q_descale, k_descale, v_descale), window_size, chunk, softcap, deterministic, impl,
                     before=max(0, lq - lk))
    o = o.view(batch, lq, *o.shape[1:])
    return (o, _batch_major(lse, batch, lq)) if return_attn_probs else o


def flash_attn_qkvpacked_func(qkv, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None,
                              window_size=(-1, -1), attention_chunk=0, softcap=0.0, deterministic=False,
                              num_heads_q=None, sm_margin=0, return_attn_probs=False, *, impl: str = "auto"):
    """flash_attn_func of qkv (batch, seqlen, 3, heads, head_dim), or (batch, seqlen, num_heads_q + 2
    kv_heads, head_dim) with num_heads_q (grouped-query heads: q's, then k's, then v's)."""
    if not isinstance(qkv, Tensor) or qkv.dim() not in (4, 5):
        raise ValueError(f"qkv must be (batch, seqlen, 3, heads, head_dim), or (batch, seqlen, heads, head_dim) "
                         f"with num_heads_q, got {tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv (batch, seqlen, 3, heads, head_dim) must have 3 at dim 2, got {tuple(qkv.shape)}")
        q, k, v = qkv.unbind(2)
    else:
        kv_heads = (qkv.shape[2] - num_heads_q) // 2 if isinstance(num_heads_q, int) else -1
        if kv_heads <= 0 or num_heads_q + 2 * kv_heads != qkv.shape[2]:
            raise ValueError(f"a 4-d qkv needs num_heads_q, with the {qkv.shape[2]} heads num_heads_q + 2 kv_heads, "
                             f"got num_heads_q={num_heads_q!r}")
        q, k, v = qkv.split([num_heads_q, kv_heads, kv_heads], dim=2)
    return flash_attn_func(q, k, v, softmax_scale, causal, None, q_descale, k_descale, v_descale, window_size,
                           attention_chunk, softcap, 1, None, deterministic, sm_margin, return_attn_probs, impl=impl)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                           seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                           k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                           num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False, *,
                           impl: str = "auto"):
    """out (total_q, heads, head_dim_v) of sequences packed without padding (sequence n at rows
    cu_seqlens[n] ..), and softmax_lse (heads, total_q) with return_attn_probs. As in FlashAttention
    3, either side may come unpacked instead, its cu_seqlens None: q (and qv) (batch, seqlen_q, heads,
    head_dim), whose out is (batch, seqlen_q, heads, head_dim_v) and softmax_lse (batch, heads,
    seqlen_q); k and v (batch, seqlen_k, kv_heads, head_dim[_v]), of which seqused_k may take the
    first keys. The max_seqlen of such a side is its seqlen."""
    dense_q = cu_seqlens_q is None
    unpacked = {**({"q": q} if dense_q else {}), **({"k": k, "v": v} if cu_seqlens_k is None else {})}
    for name, t in unpacked.items():
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seqlen, heads, head_dim) where its cu_seqlens is None, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if dense_q:
        batch, max_seqlen_q = q.shape[0], q.shape[1]
        cu_seqlens_q = _uniform_cu_seqlens(batch, max_seqlen_q, q.device)
        q, qv = (None if t is None else t.flatten(0, 1) for t in (q, qv))
    elif not isinstance(cu_seqlens_q, Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() == 0:
        raise ValueError(f"cu_seqlens_q must be an int32 tensor (batch + 1,), got "
                         f"{tuple(getattr(cu_seqlens_q, 'shape', ())) or type(cu_seqlens_q).__name__}")
    batch = cu_seqlens_q.numel() - 1
    if cu_seqlens_k is None:
        if k.shape[0] != batch:
            raise ValueError(f"k and v (batch, seqlen_k, kv_heads, head_dim) must have the {batch} sequences of "
                             f"{'q' if dense_q else 'cu_seqlens_q'}, got {tuple(k.shape)}")
        max_seqlen_k = k.shape[1]
        cu_seqlens_k = _uniform_cu_seqlens(batch, max_seqlen_k, q.device)
        k, v = k.flatten(0, 1), v.flatten(0, 1)
    used_q, used_k = (None if t is None else _index_tensor(name, t, (batch,), q.device)
                      for name, t in (("seqused_q", seqused_q), ("seqused_k", seqused_k)))
    check_qv(qv, q, v)
    o, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), used_q, used_k,
                     softmax_scale, causal, qv, (q_descale, k_descale, v_descale), window_size, attention_chunk,
                     softcap, deterministic, impl)
    if dense_q:
        o, lse = o.view(batch, -1, *o.shape[1:]), _batch_major(lse, batch, int(max_seqlen_q))
    return (o, lse) if return_attn_probs else o


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None, *, impl: str = "auto"):
    """Attentions over parts of the keys merged into the attention over all of them: out_partial
    (splits, batch, seqlen, heads, head_dim) float32 and lse_partial (splits, batch, seqlen, heads)
    float32, each part's normalized output and log-sum-exp, give (out (batch, seqlen, heads,
    head_dim) in out_dtype (default float32; written into `out` if given), softmax_lse (batch,
    seqlen, heads), a view of a (batch, heads, seqlen) tensor as FlashAttention 3's):
        lse = logsumexp_s lse_s,   out = sum_s exp(lse_s - lse) out_s,
    genfast.merge_attention with backend impl. A part of lse -inf (it saw no keys) is not read, as
    its buffer may hold garbage; a row no part saw gets out 0 and lse -inf."""
    for name, t, dims in (("out_partial", out_partial, 5), ("lse_partial", lse_partial, 4)):
        if not isinstance(t, Tensor) or t.dim() != dims or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a {dims}-d float32 tensor, got "
                             f"{(t.dtype, tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__}")
    if lse_partial.shape != out_partial.shape[:-1] or lse_partial.device != out_partial.device:
        raise ValueError(f"lse_partial must be out_partial's shape less head_dim, {tuple(out_partial.shape[:-1])}, "
                         f"on its device, got {tuple(lse_partial.shape)} on {lse_partial.device}")
    out_dtype = out_dtype or (out.dtype if out is not None else torch.float32)
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    shape = out_partial.shape[1:]
    if out is not None and (out.shape != shape or out.dtype != out_dtype or out.device != out_partial.device):
        raise ValueError(f"out must be ({', '.join(map(str, shape))}) {out_dtype} on {out_partial.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    grads = torch.is_grad_enabled() and (out_partial.requires_grad or lse_partial.requires_grad)
    if out is not None and out.dtype == torch.float32 and not grads:  # out written where it lies
        _, merged_lse = merge_attention(out_partial, lse_partial, out=(out, None), impl=impl)
        return out, merged_lse.transpose(1, 2).contiguous().transpose(1, 2)
    merged, merged_lse = merge_attention(out_partial, lse_partial, impl=impl)
    if out is None:
        out = merged.to(out_dtype)
    else:
        out.copy_(merged)
    return out, merged_lse.transpose(1, 2).contiguous().transpose(1, 2)


def _rotate_at(x, rotary_cos, rotary_sin, first, per_row, **turn):
    """x (batch, seqlen, heads, head_dim) turned at positions first[n] + i (per_row) or first[n]."""
    positions = first[:, None] + (torch.arange(x.shape[1], device=x.device, dtype=torch.int32) if per_row else 0)
    return rotary(x, rotary_cos, rotary_sin, positions.expand(x.shape[0], x.shape[1]), **turn)


def _row_sequences(cu_seqlens, total):
    """(sequence, i) of each of `total` packed rows: row cu_seqlens[n] + i is sequence n's i-th (rows
    past the last sequence count as its own)."""
    rows = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
    sequence = torch.searchsorted(cu_seqlens[1:], rows, right=True).clamp_(max=max(cu_seqlens.shape[0] - 2, 0))
    return sequence, rows - cu_seqlens[sequence]


def _turn_packed(x, cu_seqlens, first, per_row, rotary_cos, rotary_sin, **turn):
    """x (total, heads, head_dim), sequence n at rows cu_seqlens[n] .., turned at positions first[n] +
    i (per_row) or first[n]; rows past the last sequence (padding, not written anywhere) at that
    sequence's last position, which the tables hold."""
    sequence, i = _row_sequences(cu_seqlens, x.shape[0])
    i = torch.minimum(i, (cu_seqlens[1:] - cu_seqlens[:-1])[sequence] - 1).clamp_(min=0)
    positions = first[sequence] + (i if per_row else 0)
    return rotary(x[None], rotary_cos, rotary_sin, positions[None], **turn)[0]


def _check_packed_new(k, v, k_cache, v_cache, cu_seqlens_k_new, batch, device):
    _index_tensor("cu_seqlens_k_new", cu_seqlens_k_new, (batch + 1,), device)
    for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[1:] != cache.shape[2:] or t.dtype != cache.dtype \
                or t.device != cache.device:
            shape = ", ".join(map(str, cache.shape[2:]))
            raise ValueError(f"with cu_seqlens_k_new, {name} must be (total_new, {shape}) with the cache's dtype "
                             f"{cache.dtype} on its device, got "
                             f"{(t.dtype, tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have one count of new rows, got {k.shape[0]} and {v.shape[0]}")


def _append_packed(k_cache, v_cache, k, v, cu_new, held, cache_batch_idx, page_table):
    """Writes new keys and values packed without padding (sequence n's at rows cu_new[n] ..) into
    the caches at each sequence's rows held[n] .. (of its cache row, or of its pages); returns held
    plus their counts. Indexed writes, no synchronisation; the CPU checks that the rows fit."""
    counts = cu_new[1:] - cu_new[:-1]
    capacity = _cache_capacity(k_cache, page_table)
    # Rows past cu_new[-1] (a batch padded to a captured graph's size, say) are no new keys, as
    # FlashAttention 3 takes them: each writes again what the last new key writes, or where there is
    # none, what the cache's first slot already holds (without reading cu_new on the host).
    rows = torch.arange(k.shape[0], device=k.device)
    none_new = cu_new[-1] == 0
    source = torch.where(rows < cu_new[-1], rows, (cu_new[-1] - 1).clamp(min=0))
    sequence, i = (t[source] for t in _row_sequences(cu_new, k.shape[0]))
    at = torch.where(none_new, (held[sequence] + i).clamp(max=max(capacity - 1, 0)), held[sequence] + i)
    if k.device.type == "cpu" and held.numel() and not torch.compiler.is_compiling():
        over = torch.nonzero((held + counts > capacity) | (counts < 0))
        if over.numel():
            n = int(over[0, 0])
            raise ValueError(f"cu_seqlens_k_new gives sequence {n} {int(counts[n])} new keys, which from its "
                             f"cache_seqlens {int(held[n])} do not fit the {capacity} keys of its share of the "
                             f"cache")
    if page_table is not None:
        page_size = k_cache.shape[1]
        index = (page_table[sequence, at // page_size].long(), (at % page_size).long())
    else:
        index = ((sequence if cache_batch_idx is None else cache_batch_idx[sequence].long()), at.long())
    index = tuple(torch.where(none_new, 0, part) for part in index)
    for cache, new in ((k_cache, k), (v_cache, v)):
        if cache.element_size() == 1:  # float8: indexing and where on its bytes, which every torch takes
            cache, new = cache.view(torch.uint8), new.view(torch.uint8)
        cache.index_put_(index, torch.where(none_new, cache[index], new[source]))
    return held + counts


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                            cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                            q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                            scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                            return_softmax_lse=False, *, impl: str = "auto"):
    """out (batch, seqlen_q, heads, head_dim_v), or with cu_seqlens_q (queries packed without
    padding, q (total_q, heads, head_dim)) (total_q, heads, head_dim_v): q over the cache's keys,
    after k and v (when given; (batch, seqlen_new, ...), or packed (total_new, ...) by
    cu_seqlens_k_new) are written into k_cache and v_cache in place at rows cache_seqlens[n] ..,
    turned by the rotary tables at those rows or at rotary_seqlens[n] ..
    (genfast.integrations.flash_attn's flash_attn_with_kvcache; page_table is its block_table);
    attention_chunk as flash_attn_func's, each chunk's keys read in place. With
    return_softmax_lse (out, softmax_lse (batch, heads, seqlen_q) or (heads, total_q), and two
    empty tensors)."""
    chunk = _check_chunk(attention_chunk)
    packed, packed_new = cu_seqlens_q is not None, cu_seqlens_k_new is not None
    # New keys packed without padding are checked below; the dense checks see none.
    dense_k, dense_v, dense_cos = (None, None, None) if packed_new else (k, v, rotary_cos)
    if packed:
        if not isinstance(cu_seqlens_q, Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() == 0 \
                or max_seqlen_q is None:
            raise ValueError("cu_seqlens_q must be an int32 tensor (batch + 1,), with max_seqlen_q")
        if not isinstance(q, Tensor) or q.dim() != 3:
            raise ValueError(f"with cu_seqlens_q, q must be (total_q, heads, head_dim), got "
                             f"{tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__}")
        batch = cu_seqlens_q.numel() - 1
        _index_tensor("cu_seqlens_q", cu_seqlens_q, (batch + 1,), q.device)
        # q's batch is cu_seqlens_q's: checked as one of (batch, total_q / batch) rows would be.
        _check_kvcache(q[None].expand(batch, *q.shape), k_cache, v_cache, dense_k, dense_v, dense_cos,
                       cache_batch_idx, cache_leftpad, page_table)
    else:
        _check_kvcache(q, k_cache, v_cache, dense_k, dense_v, dense_cos, cache_batch_idx, cache_leftpad, page_table)
        batch = q.shape[0]
    scales = _fp8_descales(q, k_cache, v_cache, qv, (q_descale, k_descale, v_descale), batch,
                           ("q", "k_cache", "v_cache", "qv"))
    if k_cache.dtype == FP8 and k is not None:
        for name, t in (("k", k), ("v", v)):
            if isinstance(t, Tensor) and t.dtype != FP8:
                raise ValueError(f"{name} must be float8_e4m3fn, as the cache is, got {t.dtype}")
        if rotary_cos is not None:
            raise NotImplementedError("rotary_cos and rotary_sin with a float8_e4m3fn cache: turn q and k before the "
                                      "call (genfast.rotary) and pass them without the tables")
        if not packed_new:  # written as packed new keys are: by indexed copies, which float8 takes
            cu_seqlens_k_new, packed_new = _uniform_cu_seqlens(batch, k.shape[1], q.device), True
            k, v = k.flatten(0, 1), (v.flatten(0, 1) if isinstance(v, Tensor) and v.dim() == 4 else v)
    if packed_new:
        _check_packed_new(k, v, k_cache, v_cache, cu_seqlens_k_new, batch, q.device)
    check_qv(qv, q, v_cache)
    held, cache_batch_idx = _cache_rows(batch, q.device, k_cache, k, cache_seqlens, cache_batch_idx, page_table)
    if cache_leftpad is not None:
        cache_leftpad = _index_vector("cache_leftpad", cache_leftpad, batch, q.device)
    options = _options(causal, window_size, softcap)
    queries_in_sequence = _turns_queries_in_sequence(causal, window_size, chunk,
                                                     _cache_capacity(k_cache, page_table) - 1,
                                                     (int(max_seqlen_q) if packed else q.shape[1]) - 1)
    if rotary_cos is not None and (packed or packed_new or rotary_seqlens is not None):
        # Turned here, q at rotary_seqlens[n] (else at the rows the new keys go to) + i, or all at
        # its first; k at rotary_seqlens[n] + i, or by the append at its rows.
        first = held if rotary_seqlens is None else _index_tensor("rotary_seqlens", rotary_seqlens, (batch,),
                                                                  q.device)
        turn = dict(interleaved=rotary_interleaved, impl=impl)
        q = (_turn_packed(q, cu_seqlens_q, first, queries_in_sequence, rotary_cos, rotary_sin, **turn) if packed
             else _rotate_at(q, rotary_cos, rotary_sin, first, queries_in_sequence, **turn))
        if packed_new:
            k = _turn_packed(k, cu_seqlens_k_new, first, True, rotary_cos, rotary_sin, **turn)
            rotary_cos = rotary_sin = None
        elif rotary_seqlens is not None:
            k = _rotate_at(k, rotary_cos, rotary_sin, first, True, **turn)
            rotary_cos = rotary_sin = None
        queries_to_turn = None
    else:
        queries_to_turn = q
    if packed_new:
        held = _append_packed(k_cache, v_cache, k, v, cu_seqlens_k_new, held, cache_batch_idx, page_table)
    else:
        turned, held = _append_to_cache(queries_to_turn, k_cache, v_cache, k, v, held, cache_batch_idx, page_table,
                                        rotary_cos, rotary_sin, rotary_interleaved, queries_in_sequence, impl)
        q = q if turned is None else turned
    if packed:
        flat_q, cu_q, max_q = q, cu_seqlens_q, int(max_seqlen_q)
        flat_qv = qv
    else:
        lq = q.shape[1]
        flat_q, cu_q, max_q = q.reshape(batch * lq, *q.shape[2:]), _uniform_cu_seqlens(batch, lq, q.device), lq
        flat_qv = None if qv is None else qv.reshape(batch * lq, *qv.shape[2:])
    flat_q, k_cache, v_cache, flat_qv, out_scale = _fp8_widened(flat_q, k_cache, v_cache, flat_qv, scales, cu_q)
    common = dict(scale=softmax_scale, return_lse=True, impl=impl, qv=flat_qv, **options)
    if chunk:
        o, lse = _chunked_cache_attention(flat_q, cu_q, max_q, k_cache, v_cache, held, cache_batch_idx,
                                          cache_leftpad, page_table, chunk, common)
    else:
        o, lse = _attend_to_cache(flat_q, cu_q, max_q, k_cache, v_cache, held, cache_batch_idx, cache_leftpad,
                                  page_table, common)
    o = _fp8_out(o, out_scale)
    if not packed:
        o, lse = o.view(batch, max_q, *o.shape[1:]), _batch_major(lse, batch, max_q)
    return (o, lse, o.new_empty(0, dtype=torch.float32), o.new_empty(0, dtype=torch.float32)) \
        if return_softmax_lse else o


def get_scheduler_metadata(*args, **kwargs) -> Optional[Tensor]:
    """FlashAttention 3's precomputed schedule for flash_attn_with_kvcache: genfast schedules its
    own, so there is none (None, which flash_attn_with_kvcache's scheduler_metadata accepts)."""
    return None
