"""Merging partial attentions: attentions of the same queries over disjoint sets of keys, each given as
its output and log-sum-exp (genfast.attention(..., return_lse=True), attention_varlen, FlashAttention's
softmax_lse), combined into the attention over all the keys, in one pass with its backward. What
cascade inference (a shared prefix attended once for many requests), split-KV decoding, chunked
prefill over a cached prefix and ring attention do between their attention calls.
genfast.reference.attention_merge defines it."""

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from . import _backend, _checks
from .ops import attention_merge as merge_op
from .reference import attention_merge as reference

Tensor = torch.Tensor


def _sequences(o, lse):
    """Whether o and lse are sequences of the states' tensors (checked), not stacked tensors."""
    if not (isinstance(o, (list, tuple)) or isinstance(lse, (list, tuple))):
        return False
    if not (isinstance(o, (list, tuple)) and isinstance(lse, (list, tuple)) and len(o) == len(lse) and len(o)):
        raise ValueError("o and lse must both be tensors, or both non-empty sequences of tensors of one length, "
                         f"got {type(o).__name__} and {type(lse).__name__}")
    for name, parts in (("o", o), ("lse", lse)):
        for part in parts:
            if not isinstance(part, Tensor):
                raise TypeError(f"{name} must hold torch.Tensors, got {type(part).__name__}")
    if any(part.shape != o[0].shape for part in o) or any(part.shape != lse[0].shape for part in lse):
        raise ValueError(f"the states must have one shape each, got o {[tuple(p.shape) for p in o]} and lse "
                         f"{[tuple(p.shape) for p in lse]}")
    if o[0].dim() < 1 or lse[0].shape != o[0].shape[:-1]:
        raise ValueError(f"each state's lse must have its o's shape without the head dim, o {tuple(o[0].shape)}, got "
                         f"{tuple(lse[0].shape)}")
    for name, parts in (("o", o), ("lse", lse)):
        if any(part.dtype != parts[0].dtype or part.device != parts[0].device for part in parts):
            raise ValueError(f"{name}'s states must have one dtype and device, got "
                             f"{[(str(p.dtype), str(p.device)) for p in parts]}")
    return True


def _ln_base(lse_base):
    """ln of lse's base, checked."""
    if isinstance(lse_base, bool) or not isinstance(lse_base, (int, float)) or not 1 < lse_base < math.inf:
        raise ValueError(f"lse_base must be a number greater than 1 and finite (math.e for genfast's and "
                         f"FlashAttention's lse, 2 for FlashInfer's), got {lse_base!r}")
    return math.log(lse_base)


def _check(o, lse, dim, impl):
    if not (impl == "reference" and isinstance(o, Tensor) and o.dtype == torch.float64):
        _checks.check_float_tensor("o", o)
    if not isinstance(lse, Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if o.dim() < 2 or lse.shape != o.shape[:-1]:
        raise ValueError(f"lse must have o's shape without its head dim (o {tuple(o.shape)}, at least 2-d, the states "
                         f"along one dim), got {tuple(lse.shape)}")
    wanted = torch.float64 if o.dtype == torch.float64 else torch.float32
    if lse.dtype != wanted:
        raise TypeError(f"lse must be {wanted} (the log-sum-exp attention returns), got {lse.dtype}")
    if lse.device != o.device:
        raise ValueError(f"lse must be on o's device ({o.device}), got {lse.device}")
    if not -lse.dim() <= dim < lse.dim():
        raise ValueError(f"dim must index one of lse's {lse.dim()} dims (the states' dim), got {dim}")


def _collapsible(sizes, strides):
    """Whether dims of these sizes and strides view as one."""
    kept = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    return all(kept[i][1] == kept[i + 1][1] * kept[i + 1][0] for i in range(len(kept) - 1))


def _split(rows, tensors):
    """The first k for which rows[:k] and rows[k:] each view as one dim in every tensor, or None."""
    n = len(rows)
    for k in range(n + 1):
        if all(_collapsible(rows[a:b], t.stride()[a:b]) for t in tensors for a, b in ((0, k), (k, n))):
            return k
    return None


def _rows_in_two(o, lse, outputs=()):
    """The states' o (*rows, D) and lse (*rows) as (outer, inner, D) and (outer, inner): views where
    some split of the rows' dims lets every one view so, else copies; and outputs of the merge (o's
    and lse's shapes without the states) as views of that split where one split views them and the
    states alike, else None."""
    rows = tuple(lse[0].shape)
    # Contiguous tensors take k = 0 without _split's loops (decoding's small merges spent more time
    # there than merging); with two row dims they are (outer, inner) already.
    contiguous = all(t.is_contiguous() for t in (*o, *lse, *outputs))
    if contiguous and len(rows) == 2:
        return (o, lse), tuple(outputs) if outputs else None
    k = 0 if contiguous else (_split(rows, (*o, *lse, *outputs)) if outputs else None)
    outputs_fit = k is not None and bool(outputs)
    if k is None:
        k = _split(rows, (*o, *lse))
    outer, inner = (1, math.prod(rows)) if k is None else (math.prod(rows[:k]), math.prod(rows[k:]))
    states = ([t.reshape(outer, inner, t.shape[-1]) for t in o], [t.reshape(outer, inner) for t in lse])
    return states, (tuple(t.view(outer, inner, *t.shape[len(rows):]) for t in outputs) if outputs_fit else None)


def _check_out(out, rows, head_dim, dtype, device, needs_grad):
    """out's (o, lse), a new lse where it is None, checked against the merge's rows and o's head dim,
    dtype and device."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor)
            and (out[1] is None or isinstance(out[1], Tensor))):
        raise TypeError("out must be a pair (o, lse) of tensors to write the merge into, lse may be None, got "
                        f"{type(out).__name__}")
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for t, shape, wanted, name in ((out[0], rows + (head_dim,), dtype, "out[0]"), (out[1], rows, lse_dtype, "out[1]")):
        if t is not None and (tuple(t.shape) != shape or t.dtype != wanted or t.device != device):
            raise ValueError(f"{name} must be a {wanted} tensor {shape} on {device}, got {t.dtype} {tuple(t.shape)} "
                             f"on {t.device}")
    for t, name in zip(out, ("out[0]", "out[1]")):
        if t is not None and merge_op.shares_memory(t):
            raise ValueError(f"{name} must not have elements that share memory (an expanded tensor), got strides "
                             f"{t.stride()}")
    if torch.is_grad_enabled() and (needs_grad or any(t is not None and t.requires_grad for t in out)):
        raise RuntimeError("merge_attention(out=...) writes into out and has no backward; call it under "
                           "torch.no_grad() or with states and outputs that do not require grad")
    return out[0], (torch.empty(rows, dtype=lse_dtype, device=device) if out[1] is None else out[1])


def _copy_into(out, merged):
    out[0].copy_(merged[0])
    out[1].copy_(merged[1])
    return out


def merge_attention(o: Union[Tensor, Sequence[Tensor]], lse: Union[Tensor, Sequence[Tensor]], dim: int = 0, *,
                    lse_base: float = math.e, out: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
                    impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """The attention over all the keys of partial attentions of the same queries over disjoint sets of
    keys: o (..., head_dim), the partial outputs with the states along dim `dim` (of lse's dims), and
    lse (o's shape without the head dim, float32), their log-sum-exp; or sequences of the states' o
    and lse (dim unused). Returns (o, lse) without the states' dim: sum_s exp(lse_s - lse) o_s in
    o's dtype, computed in float32, and lse = log sum_s exp(lse_s) in float32. lse_base=2 takes and
    returns base-2 lse (FlashInfer's): log_2 and 2^ in place of log and exp. The states are read
    where they lie when they share one layout whose rows view as two dims and o's features are
    contiguous, up to eight anywhere and more evenly spaced: (batch, heads, queries) outputs of
    genfast.attention and (tokens, heads) packed ones of attention_varlen alike (FlashAttention's
    varlen lse, (heads, tokens), as lse.T), and states along any dim (FlashInfer's (tokens, states,
    heads, head_dim) as dim=1); other states are copied first. A state of lse -inf has no keys
    and is not read; a row whose states all have lse -inf gets o 0 and lse -inf. Differentiable in o and
    lse.

    out=(o_out, lse_out) writes the merge into them instead (lse_out may be None: a new tensor) and
    returns them, without a backward: any strides, o_out's features contiguous to be written where
    it lies; o_out and lse_out may be one of the states (a merge in place, as FlashInfer's
    merge_state_in_place), which the kernels write row by row after reading it. Outputs that overlap
    the states otherwise, or whose rows do not view as the states' two dims, are written through a
    new tensor."""
    ln_base = _ln_base(lse_base)
    if _sequences(o, lse):
        dim, o, lse, stacked = 0, list(o), list(lse), None
        _check(o[0].unsqueeze(0), lse[0].unsqueeze(0), 0, impl)
        device = o[0].device
        if out is not None:
            out = _check_out(out, tuple(lse[0].shape), o[0].shape[-1], o[0].dtype, device,
                             any(t.requires_grad for t in (*o, *lse)))
    else:
        _check(o, lse, dim, impl)
        dim, stacked, device = dim % lse.dim(), (o, lse), o.device
        if out is not None:
            out = _check_out(out, tuple(lse.shape[:dim] + lse.shape[dim + 1:]), o.shape[-1], o.dtype, device,
                             o.requires_grad or lse.requires_grad)
    backend = _backend.resolve_impl(impl, device)
    if backend == "reference" or (stacked is not None and o.shape[dim] == 0):  # no states: no keys anywhere
        if stacked is None:
            stacked = torch.stack(o, dim), torch.stack(lse, dim)
        merged = reference.attention_merge(*stacked, dim, lse_base)
        return merged if out is None else _copy_into(out, merged)
    if stacked is not None:
        o, lse = list(o.unbind(dim)), list(lse.unbind(dim))
    rows, head_dim = tuple(lse[0].shape), o[0].shape[-1]
    (o, lse), into = _rows_in_two(o, lse, () if out is None else out)
    if into is not None and (head_dim <= 1 or into[0].stride(2) == 1):
        merge_op.operator(backend, into=True)(o, lse, ln_base, *into)
        return out
    merged = merge_op.operator(backend)(o, lse, ln_base)
    if merged[1].shape != rows:
        merged = merged[0].view(rows + (head_dim,)), merged[1].view(rows)
    return merged if out is None else _copy_into(out, merged)
