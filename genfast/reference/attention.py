"""The definition of genfast's scaled-dot-product attention, in plain PyTorch.

q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv); Hk divides Hq (grouped-query attention:
query head h reads key/value head h // (Hq / Hk)). For each batch b and query head h:

    s = scale * q k^T                                  (scale: 1 / sqrt(D) unless given)
    s = scale * (q k^T + qv v^T)                       (with qv (B, Hq, Lq, Dv): scale 1 / sqrt(D + Dv))
    s = softcap * tanh(s / softcap)                     (logit soft-capping, when softcap is given)
    s = s - slope_h * |i + Lk - Lq - j|                 (ALiBi, when slopes are given)
    s = s + bias,  or s = -inf where a bool mask is False   (attn_mask, broadcast to (B, Hq, Lq, Lk))
    s = -inf where j is outside the causal or window band of i (below)
    p = softmax(s) over j;  o = dropout(p) v;  lse = logsumexp(s) over j

With attention sinks (gpt-oss's learned sinks, FlashAttention 3's learnable_sink), each query head h
has a logit sink_h that joins every row's softmax as one more score with no value:
p_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij)) and lse = log(exp(sink_h) + sum_j exp(s_ij)); a
row's probabilities then sum to less than 1, and a row masking every key has o = 0 and lse = sink_h.

qv is multi-head latent attention's absorbed form (DeepSeek's, FlashAttention 3's qv): attention of
cat(q, qv) over keys cat(k, v), whose values are v.

Causal masking keeps j <= i + offset, where offset = 0 ("top_left", torch SDPA's is_causal) or
Lk - Lq ("bottom_right": the queries are the last Lq positions of the keys, as when decoding with a
KV cache). A sliding window (left, right) keeps i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right,
bottom-right aligned as FlashAttention's; -1 leaves a side unbounded. A row that masks every key
has o = 0 and lse = -inf (SDPA would give NaN). Dropout keeps p where u >= dropout_p and scales it
by 1 / (1 - dropout_p), u the uniform of element ((b Hq + h) Lq + i) Lk + j of the Philox stream
(genfast.reference.random.philox_uniform), or of the given `dropout_uniforms`.
Everything computes in the dtype of the inputs (float64 for an exact oracle).
"""

import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor
CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


def band_mask(lq: int, lk: int, causal: Optional[str] = None, window: Optional[Tuple[int, int]] = None,
              device=None) -> Optional[Tensor]:
    """(Lq, Lk) bool, True where query i may attend key j; None when nothing is masked."""
    if causal is None and window is None:
        return None
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal is not None:
        if causal not in CAUSAL_ALIGNMENTS:
            raise ValueError(f"causal must be one of {CAUSAL_ALIGNMENTS}, got {causal!r}")
        keep &= j <= i + (0 if causal == "top_left" else lk - lq)
    if window is not None:
        left, right = window
        center = i + (lk - lq)
        if left >= 0:
            keep &= j >= center - left
        if right >= 0:
            keep &= j <= center + right
    return keep


def alibi_bias(slopes: Tensor, lq: int, lk: int) -> Tensor:
    """(H, Lq, Lk) or (B, H, Lq, Lk) for slopes (H,) or (B, H): -slope * |i + Lk - Lq - j|."""
    i = torch.arange(lq, device=slopes.device)[:, None]
    j = torch.arange(lk, device=slopes.device)[None, :]
    distance = (i + (lk - lq) - j).abs().to(slopes.dtype)
    return -slopes[..., None, None] * distance


def dropout_keep(shape, dropout_p: float, seed: int = 0, offset: int = 0, uniforms: Optional[Tensor] = None,
                 device=None) -> Tensor:
    """The kept elements (B, Hq, Lq, Lk) of dropout: u >= dropout_p."""
    if uniforms is None:
        from .random import philox_uniform

        uniforms = philox_uniform(shape, seed, offset, dtype=torch.float64, device=device)
    return uniforms >= dropout_p


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
              causal: Optional[str] = None, window: Optional[Tuple[int, int]] = None,
              alibi_slopes: Optional[Tensor] = None, softcap: Optional[float] = None, dropout_seed: int = 0,
              dropout_offset: int = 0, dropout_uniforms: Optional[Tensor] = None, return_lse: bool = False,
              sinks: Optional[Tensor] = None, qv: Optional[Tensor] = None):
    """o (B, Hq, Lq, Dv), and lse (B, Hq, Lq) with return_lse. is_causal is causal="top_left";
    sinks (Hq,): the heads' sink logits; qv (B, Hq, Lq, Dv)."""
    batch, heads, lq, dim = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    if kv_heads != heads:
        if not enable_gqa and heads != kv_heads:
            raise ValueError(f"q has {heads} heads and k {kv_heads}: pass enable_gqa=True for grouped-query attention")
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    if is_causal:
        causal = causal or "top_left"
    scale = 1.0 / math.sqrt(dim + (0 if qv is None else qv.shape[-1])) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1))
    if qv is not None:
        s = s + torch.matmul(qv, v.transpose(-2, -1))
    s = s * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes.to(s.dtype), lq, lk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    band = band_mask(lq, lk, causal, window, q.device)
    if band is not None:
        s = s.masked_fill(~band, float("-inf"))
    if sinks is not None:  # the sink's score, as column Lk of every row
        s = torch.cat([s, sinks.to(s.dtype)[:, None, None].expand(batch, heads, lq, 1)], -1)
    # Softmax with the row maximum held constant (it cancels), written so that a row masking every
    # key gives p = 0 and lse = -inf with zero gradients, and NaN propagates.
    row_max = (s.detach().amax(-1, keepdim=True) if s.shape[-1] > 0  # no key at all: every row is masked
               else s.new_full((*s.shape[:-1], 1), float("-inf")))
    masked_row = row_max == float("-inf")
    shift = torch.where(masked_row, torch.zeros_like(row_max), row_max)
    e = torch.exp(s - shift)
    total = e.sum(-1, keepdim=True)
    safe_total = torch.where(masked_row, torch.ones_like(total), total)
    p = e / safe_total
    lse = torch.where(masked_row, torch.full_like(total, float("-inf")), shift + torch.log(safe_total))[..., 0]
    if sinks is not None:
        p = p[..., :lk]
    if dropout_p > 0.0:
        keep = dropout_keep((batch, heads, lq, lk), dropout_p, dropout_seed, dropout_offset, dropout_uniforms,
                            q.device)
        p = torch.where(keep, p / (1.0 - dropout_p), torch.zeros_like(p))
    o = torch.matmul(p, v)
    return (o, lse) if return_lse else o


def paged_rows(cache: Tensor, block_table: Tensor, cu_seqlens_k: Tensor) -> Tensor:
    """A paged KV cache's keys (or values), cache (pages, page_size, Hk, D), packed as cu_seqlens_k
    lays out the sequences: row cu_seqlens_k[n] + j is row j % page_size of page block_table[n,
    j // page_size] (vLLM's and FlashAttention's block_table)."""
    page_size, bounds = cache.shape[1], cu_seqlens_k.tolist()
    rows = []
    for n in range(len(bounds) - 1):
        j = torch.arange(bounds[n + 1] - bounds[n], device=cache.device)
        rows.append(cache[block_table[n, j // page_size].long(), j % page_size])
    return torch.cat(rows) if rows else cache.new_zeros(0, *cache.shape[2:])


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     alibi_slopes: Optional[Tensor] = None, dropout_p: float = 0.0, dropout_seed: int = 0,
                     dropout_offset: int = 0, dropout_uniforms: Optional[Tensor] = None,
                     seqused_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                     qv: Optional[Tensor] = None, **options):
    """Packed sequences, as flash_attn_varlen_func takes them: q (total_q, Hq, D), k and v
    (total_k, Hk, D[v]), sequence n at rows cu_seqlens[n]:cu_seqlens[n + 1], or with seqused_k
    (batch,) its keys at rows cu_seqlens_k[n]:cu_seqlens_k[n] + seqused_k[n]; with block_table, k
    and v are a paged cache, whose keys paged_rows packs so first. Each sequence is
    attention() on its own rows (causal="bottom_right" and windows aligned to its own corner;
    alibi_slopes (Hq,) or (batch, Hq)). Dropout keeps element (h, cu_seqlens_q[n] + i,
    cu_seqlens_k[n] + j) of uniforms (Hq, total_q, total_k): the Philox stream's, or the given
    dropout_uniforms. qv (total_q, Hq, Dv): as attention()'s, row by row with q. Returns o (total_q,
    Hq, Dv) (and lse (Hq, total_q) with return_lse)."""
    if block_table is not None:
        k, v = paged_rows(k, block_table, cu_seqlens_k), paged_rows(v, block_table, cu_seqlens_k)
    outputs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if seqused_k is not None:
        bounds_k = [(start, start + used) for start, used in zip(bounds_k, seqused_k.tolist())]
    else:
        bounds_k = list(zip(bounds_k, bounds_k[1:]))
    if dropout_p > 0.0 and dropout_uniforms is None:
        from .random import philox_uniform

        dropout_uniforms = philox_uniform((q.shape[1], q.shape[0], k.shape[0]), dropout_seed, dropout_offset,
                                          dtype=torch.float64, device=q.device)
    for n in range(len(bounds_q) - 1):
        rows, keys = slice(bounds_q[n], bounds_q[n + 1]), slice(*bounds_k[n])
        qs, ks, vs = (t[r].transpose(0, 1)[None] for t, r in ((q, rows), (k, keys), (v, keys)))
        slopes = alibi_slopes[n] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        uniforms = dropout_uniforms[None, :, rows, keys] if dropout_p > 0.0 else None
        qvs = None if qv is None else qv[rows].transpose(0, 1)[None]
        result = attention(qs, ks, vs, dropout_p=dropout_p, alibi_slopes=slopes, dropout_uniforms=uniforms, qv=qvs,
                           **options)
        o, lse = result if options.get("return_lse") else (result, None)
        outputs.append(o[0].transpose(0, 1))
        if lse is not None:
            lses.append(lse[0])
    o = torch.cat(outputs, 0) if outputs else q.new_zeros(0, q.shape[1], v.shape[2])
    if not options.get("return_lse"):
        return o
    return o, (torch.cat(lses, 1) if lses else q.new_zeros(q.shape[1], 0, dtype=torch.float32))
