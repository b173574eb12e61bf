"""Scaled-dot-product attention, fused: torch.nn.functional.scaled_dot_product_attention's
signature and semantics, plus bottom-right causal alignment, sliding windows, ALiBi, logit
soft-capping, attention sinks, Philox dropout and the rows' log-sum-exp (genfast.reference.attention
defines it).

Layout (batch, heads, length, head_dim); attention_varlen takes sequences packed without padding,
as flash_attn_varlen_func does. The C++ CPU kernels, the hand-written CUDA kernels (float16 and
bfloat16) and the Triton kernels run the forward and backward passes (gradients to q, k, v, an
additive attn_mask and the log-sum-exp). Asking for a backend that cannot run the call raises
instead of falling back.

Dropout's (seed, offset) key is drawn from the generator when the forward is called, and the
backward replays it: a CUDA graph that captures a training step with dropout (keyed by a
genfast.PhiloxGenerator: torch's CUDA generators cannot be read during capture) replays the same mask.
"""

import functools
import math
import os
from typing import Optional, Tuple

import torch
from torch.nn.attention.bias import CausalBias

from . import _backend, _checks
from .ops import attention as attention_op  # (importing it registers the fakes)
from .ops.attention import check_paged_cache, check_qv
from .random import as_int64, cuda_graph_capturing, next_philox_key, takes_cuda_generator
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


def _check(q, k, v, attn_mask, dropout_p, scale, enable_gqa, causal, window, alibi_slopes, softcap, impl,
           shapes=None, sinks=None):
    """Raises on bad input, naming the argument; else returns the shapes of q, k and v. shapes: theirs
    as (batch, heads, length, head_dim) when q, k and v are laid out otherwise (attention_varlen's,
    whose tensors it has checked). A decoding step with a short cache feels each microsecond here, so
    each property is read once (each .shape makes a new Size) and Sizes are compared element by
    element (a slice is another new Size)."""
    if shapes is None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must have shape (batch, heads, length, head_dim), got {tuple(t.shape)}")
        qs, ks, vs = q.shape, k.shape, v.shape
    else:
        qs, ks, vs = shapes
    dtype, device = q.dtype, q.device
    if dtype not in _checks.FLOAT_DTYPES and not (impl == "reference" and dtype == torch.float64):
        _checks.check_float_tensor("q", q)
    if k.dtype != dtype or v.dtype != dtype:
        raise TypeError(f"k and v must have q's dtype ({dtype}), got {k.dtype} and {v.dtype}")
    if k.device != device or v.device != device:
        raise ValueError(f"k and v must be on q's device ({device}), got {k.device} and {v.device}")
    if ks[3] != qs[3]:
        raise ValueError(f"k's head_dim must equal q's ({qs[3]}), got {ks[3]}")
    if ks[0] != qs[0] or vs[0] != qs[0]:
        raise ValueError(f"k and v must have q's batch size ({qs[0]}), got {ks[0]} and {vs[0]}")
    if vs[1] != ks[1] or vs[2] != ks[2]:
        raise ValueError(f"v must have k's heads and length {tuple(ks[1:3])}, got {tuple(vs[1:3])}")
    if ks[1] != qs[1]:
        if not enable_gqa:
            raise ValueError(f"q has {qs[1]} heads and k {ks[1]}: pass enable_gqa=True for grouped-query "
                             "attention")
        if ks[1] == 0 or qs[1] % ks[1]:
            raise ValueError(f"k's heads ({ks[1]}) must divide q's heads ({qs[1]})")
    if attn_mask is not None:
        full = (qs[0], qs[1], qs[2], ks[2])
        if isinstance(attn_mask, CausalBias):  # its storage is not the mask: torch's SDPA reads its variant
            raise TypeError("attn_mask: a torch.nn.attention.bias causal mask is is_causal=True (upper left) or "
                            "causal='bottom_right' (lower right) here")
        if not isinstance(attn_mask, Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise TypeError(f"attn_mask must be a bool or floating-point tensor, got "
                            f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
        if attn_mask.dim() > 4 or any(s not in (1, f) for s, f in zip(reversed(attn_mask.shape), reversed(full))):
            raise ValueError(f"attn_mask must broadcast to (batch, heads, Lq, Lk) = {full}, got "
                             f"{tuple(attn_mask.shape)}")
        if attn_mask.device != device:
            raise ValueError(f"attn_mask must be on q's device ({device}), got {attn_mask.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if causal is not None:
        _checks.check_choice("causal", causal, reference.CAUSAL_ALIGNMENTS)
    if window is not None and (len(window) != 2 or any(int(w) != w or w < -1 for w in window)):
        raise ValueError(f"window must be (left, right), each >= 0 or -1 for unbounded, got {window}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or alibi_slopes.shape not in ((qs[1],), qs[:2]):
            raise ValueError(f"alibi_slopes must have shape (heads,) = ({qs[1]},) or (batch, heads) = "
                             f"{tuple(qs[:2])}, got {tuple(getattr(alibi_slopes, 'shape', ()))}")
        if alibi_slopes.device != device:
            raise ValueError(f"alibi_slopes must be on q's device ({device}), got {alibi_slopes.device}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (None: no soft-capping), got {softcap}")
    if sinks is not None:
        if not isinstance(sinks, Tensor) or not sinks.is_floating_point() or sinks.shape != qs[1:2]:
            raise ValueError(f"sinks must be a floating-point tensor of shape (heads,) = ({qs[1]},), got "
                             f"{getattr(sinks, 'dtype', type(sinks).__name__)} {tuple(getattr(sinks, 'shape', ()))}")
        if sinks.device != device:
            raise ValueError(f"sinks must be on q's device ({device}), got {sinks.device}")
    _checks.check_choice("impl", impl, _backend.IMPLS)
    return qs, ks, vs


def _autocast_inputs(q: Tensor, *others: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """q, k and v (and qv, or None) in torch.autocast's dtype where it is on for their device, as
    autocast casts SDPA's: a model of float32 weights under autocast hands attention a 16-bit v beside
    q and k that its rotary embedding turned in float32. float64 is left as it is, as autocast leaves it."""
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return (q, *others)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (q, *others))


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
              causal: Optional[str] = None, window: Optional[Tuple[int, int]] = None,
              alibi_slopes: Optional[Tensor] = None, softcap: Optional[float] = None, generator=None,
              return_lse: bool = False, deterministic: bool = False, impl: str = "auto",
              sinks: Optional[Tensor] = None, qv: Optional[Tensor] = None):
    """o (B, Hq, Lq, Dv), and the rows' log-sum-exp (B, Hq, Lq) float32 with return_lse.

    As torch SDPA: attn_mask bool (True attends) or additive, broadcast to (B, Hq, Lq, Lk); an
    additive mask in float32, float16 or bfloat16 is read as it is (float64 is copied to float32);
    is_causal is causal="top_left"; scale defaults to 1/sqrt(head_dim); enable_gqa lets k and v
    have fewer heads, dividing q's. Also: causal="bottom_right" (the queries are the last Lq keys);
    window=(left, right) keys around the bottom-right diagonal (-1: unbounded); alibi_slopes (Hq,)
    or (B, Hq); softcap (softcap * tanh(s / softcap)); sinks (Hq,): attention sinks, one logit per
    query head that joins each row's softmax without a value (gpt-oss's; lse includes it, and the
    sinks get their gradient); dropout from in-kernel Philox keyed by
    `generator` (a genfast.PhiloxGenerator gives the same mask on every backend). A row whose keys
    are all masked gives zeros (lse -inf), never NaN. deterministic: a backward whose bits repeat
    from run to run; without it (and without torch.use_deterministic_algorithms(True)) the CUDA
    kernels add dQ with atomics, as FlashAttention's do: 5 matrix products per block instead of 7.
    The CPU and Triton backwards are deterministic either way (Triton's atomics, slower on an H200,
    with GENFAST_TRITON_ATOMIC_DQ=1). Under torch.autocast, q, k and v (and qv) are cast to its dtype,
    as SDPA's are. qv (B, Hq, Lq, Dv): multi-head latent attention's absorbed form, as
    attention_varlen's qv: the scores are scale (q k^T + qv v^T), scale (D + Dv)^-1/2 by default."""
    q, k, v, qv = _autocast_inputs(q, k, v, qv)
    qs, ks, vs = _check(q, k, v, attn_mask, dropout_p, scale, enable_gqa, causal, window, alibi_slopes, softcap, impl,
                        sinks=sinks)
    if is_causal:
        if causal == "bottom_right":
            raise ValueError("is_causal=True is causal='top_left'; pass causal='bottom_right' alone")
        causal = "top_left"
    backend = _fused_backend(impl, q, (qs[3], vs[3]))
    if qv is not None:
        q, k, qv, backend, scale = _qv_form(impl, q, k, v, qv, scale, backend, sinks, attn_mask)
    scale = 1.0 / math.sqrt(qs[3]) if scale is None else float(scale)
    seed, offset = _dropout_key(generator, q.device) if dropout_p > 0.0 else (0, 0)
    if backend == "reference":
        return reference.attention(q, k, v, attn_mask, dropout_p, scale=scale, enable_gqa=True, causal=causal,
                                   window=window, alibi_slopes=alibi_slopes, softcap=softcap, dropout_seed=seed,
                                   dropout_offset=offset, return_lse=return_lse, sinks=sinks, qv=qv)
    _check_alibi_grad(alibi_slopes)
    lo, hi = band(qs[2], ks[2], causal, window)
    # A half-precision mask gradient takes delta from the forward's float32 o (csrc/cpu/attention.cpp's
    # backward says why): the forward keeps it for the backward, and the caller gets it rounded. A
    # mask constant along the keys needs no delta (ops/attention.py's _mask_grad_without_keys).
    float_o = (attn_mask is not None and attn_mask.requires_grad and q.dtype != torch.float32
               and torch.is_grad_enabled() and not attention_op.mask_alike_along_keys(attn_mask, sinks))
    args = (q, k, v, attn_mask, alibi_slopes, scale, softcap or 0.0, lo, hi, float(dropout_p), as_int64(seed),
            as_int64(offset), _deterministic(deterministic), float_o, sinks)
    # The overloads themselves: an OpOverloadPacket resolves its overload again on every call.
    op = (torch.ops.genfast.attention_forward_triton.default if backend == "triton"
          else torch.ops.genfast.attention_forward.default)
    o, lse = op(*args) if qv is None else op(*args, qv)
    if float_o:
        o = o.to(q.dtype)
    return (o, lse) if return_lse else o


CUDA_MAX_HEAD_DIM = 256  # of the CUDA kernels
FUSED_MAX_HEAD_DIM = 512  # of the Triton kernels (kernels/triton/attention.py's MAX_HEAD_DIM), the larger


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> Tuple[int, int]:
    """A GPU's compute capability, asked once: torch's lookup costs microseconds of every call."""
    return torch.cuda.get_device_capability(device)


def _cuda_kernels_refuse(q: Tensor, head_dim: int) -> Optional[str]:
    """Why genfast's CUDA attention kernels cannot run a call on q's GPU, or None when they can."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"they take float16 or bfloat16 q, k, v, got {q.dtype}"
    if head_dim > CUDA_MAX_HEAD_DIM:
        return f"they take head dims up to {CUDA_MAX_HEAD_DIM}, got {head_dim}"
    major, minor = _capability(q.device)
    if major < 8:
        return f"they need compute capability 8.0 or later (mma.sync, cp.async), got {major}.{minor}"
    return None


def _triton_leads(device, dims) -> bool:
    """Whether "auto" takes Triton over the CUDA kernels that could run: on Hopper GPUs (sm_90), unless
    GENFAST_ATTENTION_SM90=1 opts into the Hopper kernels. On an H200 Triton's kernels beat the sm_80
    CUDA kernels at every shape measured, bf16: forward 2.2 times as fast at head dim 128, 1.7 at 256;
    forward+backward (Triton's two passes) 1.4 to 1.9; the forward of packed sequences 1.6
    (bench/results/20261204-NVIDIA-H200-45ea074). Head dims that are not multiples of 8 stay on the
    CUDA kernels: there Triton's gradients at head dims 33 and 17 failed their test in 16 bits, for a
    reason not yet found."""
    return (all(dim % 8 == 0 for dim in dims) and _capability(device)[0] == 9
            and os.environ.get("GENFAST_ATTENTION_SM90") != "1" and _backend.triton_runs_on("cuda"))


def _fused_backend(impl: str, q: Tensor, dims: Tuple[int, int]) -> str:
    """The backend that runs a call of q's and v's head dims `dims`: on CUDA, "auto" takes the CUDA
    kernels where they run (float16 and bfloat16, head dims up to 256, sm_80 and later) but on
    Hopper GPUs (_triton_leads), else Triton (head dims up to 512), else the reference; asking for a
    backend that cannot run the call raises."""
    device = q.device
    head_dim = max(dims)
    backend = _backend.resolve_impl(impl, device)
    if device.type != "cuda":
        return backend
    if backend == "native":
        why = _cuda_kernels_refuse(q, head_dim)
        if why is None:
            return "triton" if impl == "auto" and _triton_leads(device, dims) else backend
        if impl == "native":
            hint = "; impl='triton' can" if head_dim <= FUSED_MAX_HEAD_DIM else ""
            raise TypeError(f"genfast's CUDA attention kernels cannot run this call: {why}{hint}")
        backend = "triton" if _backend.triton_runs_on(device.type) else "reference"
    if backend == "triton" and impl == "auto" and head_dim > FUSED_MAX_HEAD_DIM:
        backend = "reference"
    return backend


def _deterministic(deterministic: bool) -> bool:
    return bool(deterministic) or torch.are_deterministic_algorithms_enabled()


def _check_alibi_grad(alibi_slopes):
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("genfast.attention gives no gradient to alibi_slopes; detach them")


def _check_pages(block_table, q, k, v, batch, max_seqlen_k, dropout_p, alibi_slopes, sinks):
    """Raises on a bad paged KV cache (block_table given), naming the argument, or where a gradient
    is asked of it."""
    check_paged_cache(block_table, k, v, batch, max_seqlen_k, dropout_p)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, alibi_slopes, sinks)):
        raise ValueError("a paged KV cache (block_table) serves inference and has no backward: call attention_varlen "
                         "under torch.no_grad(), or with inputs that do not require grad")


def _qv_form(impl, q, k, v, qv, scale, backend, *others):
    """(q, k, qv, backend, scale) of a call with qv (checked) that `backend` would run without it:
    scale (D + Dv)^-1/2 by default; the reference takes qv as it is, and so do the forwards of Triton
    and the CPU where no gradient is asked (of q, k, v, qv or the call's other tensors; "auto" takes
    Triton over the CUDA kernels, which take no qv); else q and qv side by side over k and v side by
    side (qv None), a copy, whose head dim D + Dv chooses the backend again."""
    check_qv(qv, q, v)
    scale = 1.0 / math.sqrt(q.shape[-1] + v.shape[-1]) if scale is None else scale
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, qv, *others))
    cuda = q.device.type == "cuda"
    if not grads and impl == "auto" and backend == "native" and cuda and _backend.triton_runs_on("cuda"):
        backend = "triton"
    if backend == "reference" or (not grads and (backend == "triton" or (backend == "native" and not cuda))):
        return q, k, qv, backend, scale
    width = q.shape[-1] + qv.shape[-1]
    if impl == "triton" and width > FUSED_MAX_HEAD_DIM:
        raise NotImplementedError(f"qv with a gradient runs as attention of head dim head_dim + head_dim_v = {width}; "
                                  f"Triton's kernels take head dims up to {FUSED_MAX_HEAD_DIM} (without gradients "
                                  f"Triton's forward takes qv itself)")
    wide_q, wide_k = torch.cat((q, qv), -1), torch.cat((k, v), -1)
    try:
        return wide_q, wide_k, None, _fused_backend(impl, wide_q, (width, v.shape[-1])), scale
    except TypeError as error:
        raise TypeError(f"qv runs here as attention of head dim head_dim + head_dim_v = {width}: {error}") from None


def _dropout_key(generator, device):
    """Dropout's (seed, offset), drawn on the host; under CUDA graph capture only from a
    genfast.PhiloxGenerator (a torch CUDA generator's offset cannot be read then)."""
    if takes_cuda_generator(generator, device) and cuda_graph_capturing(device):
        raise RuntimeError("dropout under CUDA graph capture takes its key from "
                           "generator=genfast.PhiloxGenerator(seed) (every replay then applies the same mask); a "
                           "torch CUDA generator cannot be read while capturing")
    return next_philox_key(generator, device)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale, causal, window,
                  alibi_slopes, softcap, impl, sinks=None, seqused_k=None, block_table=None):
    """Raises on bad input, naming the argument; else returns the shapes of q and v (a paged cache's
    as (pages x page_size, heads, head_dim))."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 and (name == "q" or block_table is None):
            raise ValueError(f"{name} must have shape (total, heads, head_dim), got {tuple(t.shape)}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be an int32 tensor (batch + 1,), got "
                             f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {cu.device}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's shape {tuple(cu_seqlens_q.shape)}, got "
                         f"{tuple(cu_seqlens_k.shape)}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value}")
    if causal == "top_left" and (cu_seqlens_q is not cu_seqlens_k or seqused_k is not None):
        raise ValueError("attention_varlen aligns causal masks bottom-right, per sequence, as flash_attn_varlen_func "
                         "does; causal='top_left' is the same only when q and k share cu_seqlens (pass the same "
                         "tensor) and there is no seqused_k, else pass causal='bottom_right'")
    batch = cu_seqlens_q.shape[0] - 1
    if block_table is not None:
        _check_pages(block_table, q, k, v, batch, max_seqlen_k, dropout_p, alibi_slopes, sinks)
    # a paged cache's shapes as rows (pages x page_size): the shapes alone, since flattening a pool
    # of strided pages (rows of a longer cache) would copy it
    ks, vs = ((t.shape[0] * t.shape[1], *t.shape[2:]) if block_table is not None else t.shape for t in (k, v))
    qs = q.shape
    if seqused_k is not None and (not isinstance(seqused_k, Tensor) or seqused_k.dtype != torch.int32
                                  or tuple(seqused_k.shape) != (batch,) or seqused_k.device != q.device):
        raise ValueError(f"seqused_k must be an int32 tensor of shape (batch,) = ({batch},) on q's device "
                         f"({q.device}), got {getattr(seqused_k, 'dtype', type(seqused_k).__name__)} "
                         f"{tuple(getattr(seqused_k, 'shape', ()))}"
                         f"{' on ' + str(seqused_k.device) if isinstance(seqused_k, Tensor) else ''}")
    if alibi_slopes is not None and isinstance(alibi_slopes, Tensor) and alibi_slopes.dim() == 2:
        if alibi_slopes.shape != (batch, qs[1]):
            raise ValueError(f"alibi_slopes must have shape (heads,) = ({qs[1]},) or (batch, heads) = "
                             f"({batch}, {qs[1]}), got {tuple(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes[0]
    # The shared checks on (batch, heads, length, dim) shapes: one batch of the packed lengths.
    shapes = ((1, qs[1], qs[0], qs[2]), (1, ks[1], ks[0], ks[2]), (1, vs[1], vs[0], vs[2]))
    _check(q, k, v, None, dropout_p, scale, True, causal, window, alibi_slopes, softcap, impl, shapes, sinks)
    return qs, vs


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, dropout_p: float = 0.0, scale: Optional[float] = None, *,
                     causal: Optional[str] = None, window: Optional[Tuple[int, int]] = None,
                     alibi_slopes: Optional[Tensor] = None, softcap: Optional[float] = None, generator=None,
                     return_lse: bool = False, deterministic: bool = False, impl: str = "auto",
                     sinks: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None,
                     block_table: Optional[Tensor] = None, qv: Optional[Tensor] = None):
    """Attention over sequences packed without padding, as flash_attn_varlen_func takes them:
    q (total_q, Hq, D), k and v (total_k, Hk, D[v]), sequence n at rows cu_seqlens[n] ..
    cu_seqlens[n + 1] (int32, on q's device; max_seqlen_* bound the lengths, and with seqused_k
    max_seqlen_k bounds the keys used, as FlashAttention 3 takes it; neither is checked on the GPU,
    which would synchronize). Returns o (total_q, Hq, Dv), and lse (Hq, total_q) float32
    with return_lse. Each sequence is genfast.attention of its own rows, with the causal mask and
    window aligned to its bottom-right corner; alibi_slopes (Hq,) or (batch, Hq); sinks (Hq,). No attn_mask.
    Dropout keeps element (h total_q + cu_seqlens_q[n] + i) total_k + cu_seqlens_k[n] + j of the
    Philox stream (reference.varlen_attention). deterministic as genfast.attention's.
    seqused_k (int32 (batch,), FlashAttention 3's): sequence n has only the first seqused_k[n] keys of
    its rows, the rest getting no weight and a zero gradient; with cu_seqlens_k = n L, it decodes from
    a padded KV cache (batch, L, Hk, D) flattened to (batch L, Hk, D), each sequence's keys so far at
    the front of its row, as flash_attn_with_kvcache's cache_seqlens. Each must lie in 0 ..
    cu_seqlens_k[n + 1] - cu_seqlens_k[n]; the CPU checks it, a GPU does not (that would synchronize).
    block_table (int32 (batch, pages per sequence), vLLM's and flash_attn_with_kvcache's): k and v are
    a paged KV cache (pages, page_size, Hk, D[v]), key j of sequence n at row j % page_size of page
    block_table[n, j // page_size], and cu_seqlens_k gives the sequences' key counts alone (their
    totals need not match k). Any page_size: vLLM's 16, SGLang's 1. For
    inference: no dropout and no gradient. The CPU checks the table's entries; a GPU does not.
    qv (total_q, Hq, Dv), in q's dtype (FlashAttention 3's, multi-head latent attention's absorbed
    form, as DeepSeek's models decode): the scores are scale (q k^T + qv v^T), attention of cat(q,
    qv) over keys cat(k, v), scale (D + Dv)^-1/2 by default. Where no gradient is asked, Triton's
    forward and the CPU's read qv and score it against the values they read anyway, copying nothing
    ("auto" takes Triton on a GPU); the CUDA kernels and gradients take that concatenation, a copy
    of q, qv, k and v (of the whole cache, with one). Under torch.autocast, q, k, v (and qv) are
    cast to its dtype, as genfast.attention's."""
    q, k, v, qv = _autocast_inputs(q, k, v, qv)
    qs, vs = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale, causal,
                           window, alibi_slopes, softcap, impl, sinks, seqused_k, block_table)
    backend = _fused_backend(impl, q, (qs[2], vs[2]))
    if qv is not None:
        q, k, qv, backend, scale = _qv_form(impl, q, k, v, qv, scale, backend, sinks)
    scale = 1.0 / math.sqrt(qs[2]) if scale is None else float(scale)
    seed, offset = _dropout_key(generator, q.device) if dropout_p > 0.0 else (0, 0)
    if backend == "reference":
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=True, causal=causal, window=window, alibi_slopes=alibi_slopes,
                                          softcap=softcap, dropout_seed=seed, dropout_offset=offset,
                                          return_lse=return_lse, sinks=sinks, seqused_k=seqused_k,
                                          block_table=block_table, qv=qv)
    _check_alibi_grad(alibi_slopes)
    lo, hi = band(0, 0, causal, window)  # relative to each sequence's bottom-right diagonal
    # max(seqused_k), or through a block table the longest sequence's keys, is 0 where every
    # sequence's cache is empty; the CUDA kernels' grids come from max_seqlen_k, and 1 bounds those
    # keys as well (within a block table of at least one page).
    may_be_empty = seqused_k is not None if block_table is None else block_table.shape[1] > 0
    max_seqlen_k = max(int(max_seqlen_k), 1) if may_be_empty else int(max_seqlen_k)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), max_seqlen_k, alibi_slopes, scale,
            softcap or 0.0, lo, hi, float(dropout_p), as_int64(seed), as_int64(offset), _deterministic(deterministic),
            sinks, seqused_k, block_table)
    op = (torch.ops.genfast.attention_varlen_forward_triton.default if backend == "triton"
          else torch.ops.genfast.attention_varlen_forward.default)
    o, lse = op(*args) if qv is None else op(*args, qv)
    return (o, lse) if return_lse else o
