"""Scaled-dot-product attention, fused: torch.nn.functional.scaled_dot_product_attention's
signature and semantics, plus bottom-right causal alignment, sliding windows, ALiBi, logit
soft-capping, Philox dropout and the rows' log-sum-exp (genfast.reference.attention defines it).

Layout (batch, heads, length, head_dim). The C++ CPU kernels and the Triton kernels run the
forward and backward passes (gradients to q, k, v, an additive attn_mask and the log-sum-exp); the
hand-written CUDA kernels and varlen packing follow (issue 6). Asking for a backend that is missing
raises instead of falling back.
"""

import math
from typing import Optional, Tuple

import torch

from . import _backend, _checks
from .ops import attention as _attention_op  # noqa: F401  (registers the fake)
from .random import as_int64, kernel_noise_key
from .reference import attention as reference

Tensor = torch.Tensor
UNBOUNDED = 1 << 62


def band(lq: int, lk: int, causal: Optional[str], window: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """(band_lo, band_hi): query i sees keys i + band_lo <= j <= i + band_hi (reference.band_mask)."""
    lo, hi = -UNBOUNDED, UNBOUNDED
    if causal is not None:
        hi = 0 if causal == "top_left" else lk - lq
    if window is not None:
        left, right = window
        if left >= 0:
            lo = lk - lq - left
        if right >= 0:
            hi = min(hi, lk - lq + right)
    return lo, hi


def _check(q, k, v, attn_mask, dropout_p, scale, enable_gqa, causal, window, alibi_slopes, softcap, impl):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not (impl == "reference" and isinstance(t, Tensor) and t.dtype == torch.float64):
            _checks.check_float_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, length, head_dim), got {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype ({q.dtype}), got {k.dtype} and {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k and v must be on q's device ({q.device}), got {k.device} and {v.device}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k's head_dim must equal q's ({q.shape[3]}), got {k.shape[3]}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must have q's batch size ({q.shape[0]}), got {k.shape[0]} and {v.shape[0]}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"v must have k's heads and length {tuple(k.shape[1:3])}, got {tuple(v.shape[1:3])}")
    if k.shape[1] != q.shape[1]:
        if not enable_gqa:
            raise ValueError(f"q has {q.shape[1]} heads and k {k.shape[1]}: pass enable_gqa=True for grouped-query "
                             "attention")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ValueError(f"k's heads ({k.shape[1]}) must divide q's heads ({q.shape[1]})")
    if attn_mask is not None:
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if not isinstance(attn_mask, Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise TypeError(f"attn_mask must be a bool or floating-point tensor, got "
                            f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
        if attn_mask.dim() > 4 or any(s not in (1, f) for s, f in zip(reversed(attn_mask.shape), reversed(full))):
            raise ValueError(f"attn_mask must broadcast to (batch, heads, Lq, Lk) = {full}, got "
                             f"{tuple(attn_mask.shape)}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on q's device ({q.device}), got {attn_mask.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if causal is not None:
        _checks.check_choice("causal", causal, reference.CAUSAL_ALIGNMENTS)
    if window is not None and (len(window) != 2 or any(int(w) != w or w < -1 for w in window)):
        raise ValueError(f"window must be (left, right), each >= 0 or -1 for unbounded, got {window}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or alibi_slopes.shape not in ((q.shape[1],), q.shape[:2]):
            raise ValueError(f"alibi_slopes must have shape (heads,) = ({q.shape[1]},) or (batch, heads) = "
                             f"{tuple(q.shape[:2])}, got {tuple(getattr(alibi_slopes, 'shape', ()))}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be on q's device ({q.device}), got {alibi_slopes.device}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (None: no soft-capping), got {softcap}")
    _checks.check_choice("impl", impl, _backend.IMPLS)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
              causal: Optional[str] = None, window: Optional[Tuple[int, int]] = None,
              alibi_slopes: Optional[Tensor] = None, softcap: Optional[float] = None, generator=None,
              return_lse: bool = False, impl: str = "auto"):
    """o (B, Hq, Lq, Dv), and the rows' log-sum-exp (B, Hq, Lq) float32 with return_lse.

    As torch SDPA: attn_mask bool (True attends) or additive, broadcast to (B, Hq, Lq, Lk);
    is_causal is causal="top_left"; scale defaults to 1/sqrt(head_dim); enable_gqa lets k and v
    have fewer heads, dividing q's. Also: causal="bottom_right" (the queries are the last Lq keys);
    window=(left, right) keys around the bottom-right diagonal (-1: unbounded); alibi_slopes (Hq,)
    or (B, Hq); softcap (softcap * tanh(s / softcap)); dropout from in-kernel Philox keyed by
    `generator` (a genfast.PhiloxGenerator gives the same mask on every backend). A row whose keys
    are all masked gives zeros (lse -inf), never NaN."""
    _check(q, k, v, attn_mask, dropout_p, scale, enable_gqa, causal, window, alibi_slopes, softcap, impl)
    if is_causal:
        if causal == "bottom_right":
            raise ValueError("is_causal=True is causal='top_left'; pass causal='bottom_right' alone")
        causal = "top_left"
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    backend = _backend.resolve_impl(impl, q.device)
    if impl == "auto" and backend == "native" and q.device.type != "cpu":
        backend = "triton" if _backend.triton_runs_on(q.device.type) else "reference"  # no CUDA kernel yet
    if backend == "native" and q.device.type != "cpu":
        raise NotImplementedError(f"genfast.attention has no native kernel for {q.device.type} yet; "
                                  "use impl='reference'")
    seed, offset, cuda_generator = 0, 0, None
    if dropout_p > 0.0:
        cuda_generator, key = kernel_noise_key(generator, q.device, backend)
        seed, offset = key if key is not None else (0, 0)
    if backend == "reference":
        return reference.attention(q, k, v, attn_mask, dropout_p, scale=scale, enable_gqa=True, causal=causal,
                                   window=window, alibi_slopes=alibi_slopes, softcap=softcap, dropout_seed=seed,
                                   dropout_offset=offset, return_lse=return_lse)
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("genfast.attention gives no gradient to alibi_slopes; detach them")
    lo, hi = band(q.shape[2], k.shape[2], causal, window)
    args = (q, k, v, attn_mask, alibi_slopes, scale, softcap or 0.0, lo, hi, float(dropout_p))
    if backend == "triton":
        o, lse = torch.ops.genfast.attention_forward_triton(*args, as_int64(seed), as_int64(offset))
    else:
        o, lse = torch.ops.genfast.attention_forward(*args, cuda_generator, as_int64(seed), as_int64(offset))
    return (o, lse) if return_lse else o
