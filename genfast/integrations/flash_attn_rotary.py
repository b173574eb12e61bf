"""FlashAttention's rotary embedding functions (flash_attn.layers.rotary, flash_attn.ops.triton.rotary)
on genfast.rotary, for code written against them: change the import,

    from flash_attn.layers.rotary import RotaryEmbedding, apply_rotary_emb, apply_rotary_emb_qkv_
    from genfast.integrations.flash_attn import RotaryEmbedding, apply_rotary_emb, apply_rotary_emb_qkv_

(or from this module), and they run on every genfast backend, the CPU included. Arguments, layouts
and semantics are FlashAttention's: x (batch, seqlen, heads, head_dim), or (total, heads, head_dim)
packed by cu_seqlens; cos and sin (seqlen_rotary, rotary_dim / 2) in x's dtype; rotary_dim <=
head_dim, the rest of each head unchanged; seqlen_offsets an int or one per sequence (int32 or
int64); GPT-NeoX's planes by default (interleaved=False). All are differentiable in x, the in-place
forms too. cos and sin get no gradient, as in FlashAttention, and where they require one genfast
raises, where FlashAttention silently gives none. A position past the tables raises on the CPU and
turns by nothing on a GPU, as in FlashAttention's kernel. max_seqlen is accepted and not needed.
RotaryEmbedding, the layer FlashAttention's MHA uses, keeps its tables as FlashAttention does (XPos
scaling with scale_base included) and turns through these functions.
"""

from typing import Optional, Union

import torch

from ..rotary import rotary

Tensor = torch.Tensor

__all__ = ["RotaryEmbedding", "apply_rotary", "apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_kv_",
           "apply_rotary_emb_qkv_"]


def _check_offsets(seqlen_offsets, batch: int):
    if isinstance(seqlen_offsets, Tensor) and seqlen_offsets.shape != (batch,):
        raise ValueError(f"seqlen_offsets must be an int or a tensor (batch,) = ({batch},), got "
                         f"{tuple(seqlen_offsets.shape)}")


def _positions(batch: int, seqlen: int, seqlen_offsets, device) -> Tensor:
    """Token i of sequence n at i + seqlen_offsets[n] (or + seqlen_offsets): (batch or 1, seqlen)."""
    positions = torch.arange(seqlen, dtype=torch.int32, device=device)[None]
    _check_offsets(seqlen_offsets, batch)
    if isinstance(seqlen_offsets, Tensor):
        return positions + seqlen_offsets.to(device=device, dtype=torch.int32)[:, None]
    return positions + int(seqlen_offsets)


def _packed_positions(total: int, cu_seqlens: Tensor, seqlen_offsets, device) -> Tensor:
    """(1, total): a packed token's position in its sequence, plus the sequence's offset."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-d tensor (batch + 1,) of cumulative sequence lengths")
    batch = cu_seqlens.numel() - 1
    token = torch.arange(total, dtype=cu_seqlens.dtype, device=device)
    # the sequence of each token, without reading cu_seqlens on the host
    sequence = torch.searchsorted(cu_seqlens[1:].contiguous(), token, right=True).clamp_(max=max(batch - 1, 0))
    positions = token - cu_seqlens[sequence] if batch > 0 else token
    _check_offsets(seqlen_offsets, batch)
    if isinstance(seqlen_offsets, Tensor):
        positions = positions + seqlen_offsets.to(device)[sequence]
    else:
        positions = positions + int(seqlen_offsets)
    return positions.to(torch.int32)[None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, seqlen_offsets: Union[int, Tensor] = 0,
                 cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None, interleaved: bool = False,
                 inplace: bool = False, conjugate: bool = False, *, impl: str = "auto") -> Tensor:
    """flash_attn.ops.triton.rotary.apply_rotary: conjugate turns back (the backward's turn)."""
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x must be (batch, seqlen, heads, head_dim) without cu_seqlens, got {tuple(x.shape)}")
        positions = _positions(x.shape[0], x.shape[1], seqlen_offsets, x.device)
        return rotary(x, cos, sin, positions, interleaved=interleaved, inverse=conjugate, inplace=inplace, impl=impl)
    if x.dim() != 3:
        raise ValueError(f"x must be (total_seqlen, heads, head_dim) with cu_seqlens, got {tuple(x.shape)}")
    positions = _packed_positions(x.shape[0], cu_seqlens, seqlen_offsets, x.device)
    turned = rotary(x[None], cos, sin, positions, interleaved=interleaved, inverse=conjugate, inplace=inplace,
                    impl=impl)
    return x if inplace else turned[0]


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False,
                     seqlen_offsets: Union[int, Tensor] = 0, cu_seqlens: Optional[Tensor] = None,
                     max_seqlen: Optional[int] = None, *, impl: str = "auto") -> Tensor:
    """flash_attn.layers.rotary.apply_rotary_emb: x turned at its positions (plus seqlen_offsets)."""
    return apply_rotary(x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, interleaved, inplace, impl=impl)


apply_rotary_emb_func = apply_rotary_emb  # FlashAttention's alias


def apply_rotary_emb_qkv_(qkv: Tensor, cos: Tensor, sin: Tensor, cos_k: Optional[Tensor] = None,
                          sin_k: Optional[Tensor] = None, interleaved: bool = False,
                          seqlen_offsets: Union[int, Tensor] = 0, num_heads_q: Optional[int] = None, *,
                          impl: str = "auto") -> Tensor:
    """qkv (batch, seqlen, 3, heads, head_dim), or (batch, seqlen, heads_q + 2 heads_k, head_dim)
    with num_heads_q: q and k turned in place (k by cos_k and sin_k where given); returns qkv."""
    if num_heads_q is None:
        if qkv.dim() != 5 or qkv.shape[2] != 3:
            raise ValueError(f"qkv must be (batch, seqlen, 3, heads, head_dim), got {tuple(qkv.shape)}")
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        if qkv.dim() != 4 or (qkv.shape[2] - num_heads_q) % 2 != 0 or qkv.shape[2] <= num_heads_q:
            raise ValueError(f"qkv must be (batch, seqlen, num_heads_q + 2 heads_k, head_dim) with num_heads_q = "
                             f"{num_heads_q}, got {tuple(qkv.shape)}")
        heads_k = (qkv.shape[2] - num_heads_q) // 2
        q, k = qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q:num_heads_q + heads_k]
    if (cos_k is None) != (sin_k is None):
        raise ValueError("cos_k and sin_k go together: pass both, or neither to turn k by cos and sin")
    cos_k, sin_k = (cos, sin) if cos_k is None else (cos_k, sin_k)
    apply_rotary(q, cos, sin, seqlen_offsets, interleaved=interleaved, inplace=True, impl=impl)
    apply_rotary(k, cos_k, sin_k, seqlen_offsets, interleaved=interleaved, inplace=True, impl=impl)
    return qkv


def apply_rotary_emb_kv_(kv: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                         seqlen_offsets: Union[int, Tensor] = 0, *, impl: str = "auto") -> Tensor:
    """kv (batch, seqlen, 2, heads, head_dim): k turned in place; returns kv."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must be (batch, seqlen, 2, heads, head_dim), got {tuple(kv.shape)}")
    apply_rotary(kv[:, :, 0], cos, sin, seqlen_offsets, interleaved=interleaved, inplace=True, impl=impl)
    return kv


class RotaryEmbedding(torch.nn.Module):
    """flash_attn.layers.rotary.RotaryEmbedding: the tables of `dim` rotary features (inv_freq =
    base^(-2m / dim)), computed for the longest sequence seen (positions in float32 unless
    pos_idx_in_fp32=False) and kept in the inputs' dtype; with scale_base, XPos's scaling (queries'
    tables times scale^power, keys' divided by it, power = (position - seqlen // 2) / scale_base).
    forward(qkv) turns q and k of a packed qkv in place; forward(q, kv) turns q and kv's k in place
    and returns (q, kv). impl picks genfast's backend."""

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, scale_base: Optional[float] = None,
                 pos_idx_in_fp32: bool = True, device=None, *, impl: str = "auto"):
        super().__init__()
        self.dim, self.base, self.interleaved, self.scale_base = dim, float(base), interleaved, scale_base
        self.pos_idx_in_fp32, self.impl = pos_idx_in_fp32, impl
        self.register_buffer("inv_freq", self._inverse_frequencies(device), persistent=False)
        scale = ((torch.arange(0, dim, 2, device=device, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)
                 if scale_base is not None else None)
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = self._cos_k_cached = self._sin_k_cached = None

    def _inverse_frequencies(self, device=None) -> Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def _update_cos_sin_cache(self, seqlen: int, device=None, dtype=None):
        if (seqlen > self._seq_len_cached or self._cos_cached is None or self._cos_cached.device != device
                or self._cos_cached.dtype != dtype or (self.training and self._cos_cached.is_inference())):
            self._seq_len_cached = seqlen
            if self.pos_idx_in_fp32:  # positions past 2048 are not exact in bfloat16
                t = torch.arange(seqlen, device=device, dtype=torch.float32)
                inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._inverse_frequencies(device)
            else:
                t = torch.arange(seqlen, device=device, dtype=self.inv_freq.dtype)
                inv_freq = self.inv_freq
            freqs = torch.outer(t, inv_freq.to(device))
            if self.scale is None:
                self._cos_cached, self._sin_cached = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
            else:
                power = (torch.arange(seqlen, dtype=self.scale.dtype, device=self.scale.device)
                         - seqlen // 2) / self.scale_base
                scale = self.scale.to(device=power.device) ** power[:, None]
                self._cos_cached, self._sin_cached = ((torch.cos(freqs) * scale).to(dtype),
                                                      (torch.sin(freqs) * scale).to(dtype))
                self._cos_k_cached, self._sin_k_cached = ((torch.cos(freqs) / scale).to(dtype),
                                                          (torch.sin(freqs) / scale).to(dtype))

    def forward(self, qkv: Tensor, kv: Optional[Tensor] = None, seqlen_offset: Union[int, Tensor] = 0,
                max_seqlen: Optional[int] = None, num_heads_q: Optional[int] = None):
        """qkv (batch, seqlen, 3, heads, head_dim) (or heads_q + 2 heads_k with num_heads_q), or q
        (batch, seqlen, heads, head_dim) with kv (batch, seqlen, 2, heads, head_dim); seqlen_offset an
        int or one per sequence (then max_seqlen sizes the tables)."""
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        elif self._cos_cached is None:
            raise ValueError("a tensor seqlen_offset needs max_seqlen (or an earlier call) to size the tables")
        cos, sin = self._cos_cached, self._sin_cached
        cos_k, sin_k = (self._cos_k_cached, self._sin_k_cached) if self.scale is not None else (cos, sin)
        if kv is None:
            return apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, interleaved=self.interleaved,
                                         seqlen_offsets=seqlen_offset, num_heads_q=num_heads_q, impl=self.impl)
        q = apply_rotary_emb(qkv, cos, sin, interleaved=self.interleaved, inplace=True, seqlen_offsets=seqlen_offset,
                             impl=self.impl)
        kv = apply_rotary_emb_kv_(kv, cos_k, sin_k, interleaved=self.interleaved, seqlen_offsets=seqlen_offset,
                                  impl=self.impl)
        return q, kv
