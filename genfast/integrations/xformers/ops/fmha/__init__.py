"""xformers.ops.fmha on genfast's kernels: memory_efficient_attention and its forward, backward,
partial and merge functions, with xformers' arguments, layouts and biases (attn_bias.py).

q, k and v are (batch, seqlen, heads, dim), or (batch, seqlen, dim) with one head, or (batch,
seqlen, groups, heads, dim) for grouped-query attention: k and v expanded over each group's heads,
as xformers asks, are read once and not copied. The biases run as genfast's causal masks and windows
(LowerTriangularMask, the FromBottomRight and local masks), packed sequences (BlockDiagonalMask and
its causal and local forms, q, k and v of batch 1), a padded KV cache (BlockDiagonalPaddedKeysMask,
BlockDiagonalCausalWithOffsetPaddedKeysMask and their local forms: attention_varlen's seqused_k) and
a paged one (PagedBlockDiagonal*PaddedKeysMask: its block_table, for inference), keys anywhere (the
gappy-keys biases, below); a tensor bias (batch, heads, queries, keys), with its gradient, and
LowerTriangularMask's add_bias. xformers' own bias objects are read as this module's, by class name.
Where there is no tensor bias (and LowerTriangularMask's keys are as many as its queries), genfast
reads q, k and v and writes the output in this layout without a copy (attention_varlen); else the
output is made contiguous from genfast.attention's (batch, heads, queries, dim).

Where genfast differs:
- dropout draws from genfast's Philox stream, keyed by torch's default generator: the same
  distribution, other masks;
- op is accepted and ignored (xformers' operator names are here, as placeholders); impl (genfast's
  keyword) picks the backend;
- a tensor bias may have 1 in a dim, read broadcast (xformers asks for the whole shape);
- a row whose keys are all masked gets output 0 and lse -inf;
- memory_efficient_attention_backward runs the forward again and differentiates it (genfast's
  backward kernels read state its own forward keeps), and memory_efficient_attention_partial's
  output is genfast's in q's dtype widened to float32 (xformers writes float32 itself); partial
  results are differentiable;
- BlockDiagonalCausalMask and its local form over blocks of queries and keys of other lengths run
  block by block;
- gappy keys (BlockDiagonalGappyKeysMask and its forms) whose blocks follow one another run as
  attention_varlen's seqused_k, with gradients; blocks out of order or sharing keys, and the paged
  forms, through a table of each key's row (attention_varlen's paged cache of one-row pages, for
  inference);
- not taken: quantized (int32) keys and values."""

from typing import List, Optional, Sequence, Tuple, Type, Union

import torch

from .....attention import attention, attention_varlen
from .....attention_merge import merge_attention
from ....flash_attn import _batch_major, _uniform_cu_seqlens
from . import attn_bias
from .attn_bias import (VARLEN_BIASES, AttentionBias, BlockDiagonalCausalMask, BlockDiagonalMask,
                        LowerTriangularMask, LowerTriangularMaskWithTensorBias, band)

Tensor = torch.Tensor

__all__ = ["ALL_BW_OPS", "ALL_FW_OPS", "AttentionBias", "AttentionBwOpBase", "AttentionFwOpBase", "AttentionOp",
           "AttentionOpBase", "BlockDiagonalCausalMask", "BlockDiagonalMask", "LowerTriangularMask",
           "LowerTriangularMaskWithTensorBias", "MemoryEfficientAttentionCkOp",
           "MemoryEfficientAttentionCutlassFwdFlashBwOp", "MemoryEfficientAttentionCutlassOp",
           "MemoryEfficientAttentionFlashAttentionOp", "VARLEN_BIASES", "attn_bias", "memory_efficient_attention",
           "memory_efficient_attention_backward", "memory_efficient_attention_forward",
           "memory_efficient_attention_forward_requires_grad", "memory_efficient_attention_partial",
           "merge_attentions"]


class AttentionOpBase:
    """xformers' kernel choices, for op=: genfast takes them and runs its own kernels (impl= picks)."""

    NAME = "genfast"


class AttentionFwOpBase(AttentionOpBase):
    pass


class AttentionBwOpBase(AttentionOpBase):
    pass


AttentionOp = Tuple[Optional[Type[AttentionFwOpBase]], Optional[Type[AttentionBwOpBase]]]
ALL_FW_OPS: List[Type[AttentionFwOpBase]] = [AttentionFwOpBase]
ALL_BW_OPS: List[Type[AttentionBwOpBase]] = [AttentionBwOpBase]
MemoryEfficientAttentionFlashAttentionOp = MemoryEfficientAttentionCutlassOp = (AttentionFwOpBase, AttentionBwOpBase)
MemoryEfficientAttentionCutlassFwdFlashBwOp = MemoryEfficientAttentionCkOp = (AttentionFwOpBase, AttentionBwOpBase)


def memory_efficient_attention(query: Tensor, key: Tensor, value: Tensor,
                               attn_bias: Optional[Union[Tensor, AttentionBias]] = None, p: float = 0.0,
                               scale: Optional[float] = None, *, op=None, output_dtype: Optional[torch.dtype] = None,
                               impl: str = "auto") -> Tensor:
    """softmax(scale query key^T + attn_bias) value, dropout p on the weights: (batch, seqlen_q,
    heads, dim_v) in the inputs' form. scale defaults to dim^-1/2. Differentiable."""
    return _run(query, key, value, attn_bias, p, scale, output_dtype, impl)[0]


def memory_efficient_attention_forward(query: Tensor, key: Tensor, value: Tensor,
                                       attn_bias: Optional[Union[Tensor, AttentionBias]] = None, p: float = 0.0,
                                       scale: Optional[float] = None, *, op=None,
                                       output_dtype: Optional[torch.dtype] = None, impl: str = "auto") -> Tensor:
    """memory_efficient_attention without a backward."""
    with torch.no_grad():
        return _run(query, key, value, attn_bias, p, scale, output_dtype, impl)[0]


def memory_efficient_attention_forward_requires_grad(query: Tensor, key: Tensor, value: Tensor,
                                                     attn_bias: Optional[Union[Tensor, AttentionBias]] = None,
                                                     p: float = 0.0, scale: Optional[float] = None, *, op=None,
                                                     output_dtype: Optional[torch.dtype] = None,
                                                     impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """(output, lse) for memory_efficient_attention_backward: lse float32 (batch, heads, seqlen_q),
    (batch, groups, heads, seqlen_q) for 5-d inputs, (1, heads, total) for packed sequences."""
    _no_dropout(p)
    with torch.no_grad():
        return _run(query, key, value, attn_bias, p, scale, output_dtype, impl)


def memory_efficient_attention_backward(grad: Tensor, output: Tensor, lse: Tensor, query: Tensor, key: Tensor,
                                        value: Tensor, attn_bias: Optional[Union[Tensor, AttentionBias]] = None,
                                        p: float = 0.0, scale: Optional[float] = None, *, op=None,
                                        impl: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for the upstream gradient `grad`. output and lse are not read: genfast runs the
    forward again."""
    _no_dropout(p)
    if grad.shape != output.shape:
        raise ValueError(f"grad must have output's shape {tuple(output.shape)}, got {tuple(grad.shape)}")
    # contiguous: 5-d k and v expanded over heads get one gradient a head, as xformers gives them
    leaves = [t.detach().contiguous().requires_grad_() for t in (query, key, value)]
    with torch.enable_grad():
        out = memory_efficient_attention(*leaves, attn_bias, 0.0, scale, impl=impl)
        return torch.autograd.grad(out, leaves, grad.to(out.dtype))


def memory_efficient_attention_partial(query: Tensor, key: Tensor, value: Tensor,
                                       attn_bias: Optional[Union[Tensor, AttentionBias]] = None, p: float = 0.0,
                                       scale: Optional[float] = None, *, op=None,
                                       output_dtype: Optional[torch.dtype] = None,
                                       impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """(output, lse) of the queries over part of the keys, for merge_attentions: output float32
    (float64 for float64 inputs) unless output_dtype says otherwise."""
    _no_dropout(p)
    out, lse = _run(query, key, value, attn_bias, p, scale, None, impl)
    wide = torch.float64 if query.dtype == torch.float64 else torch.float32
    return out.to(output_dtype or wide), lse


def merge_attentions(attn_split: Union[Tensor, Sequence[Tensor]], lse_split: Union[Tensor, Sequence[Tensor]],
                     write_lse: bool = True, output_dtype: Optional[torch.dtype] = None,
                     impl: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    """The attention over all the keys of partial ones over disjoint keys (genfast.merge_attention):
    attn_split a sequence of (batch, seqlen, [groups,] heads, dim) or one tensor with the chunks first,
    lse_split (batch, [groups,] heads, seqlen) likewise. Returns (out, lse or None)."""
    stacked = isinstance(attn_split, Tensor)
    if stacked != isinstance(lse_split, Tensor):
        raise ValueError("attn_split and lse_split must both be tensors or both sequences of tensors")
    if stacked:
        if lse_split.dim() != attn_split.dim() - 1 or attn_split.dim() not in (5, 6):
            raise ValueError(f"attn_split must be (chunks, batch, seqlen, [groups,] heads, dim) and lse_split "
                             f"(chunks, batch, [groups,] heads, seqlen), got {tuple(attn_split.shape)} and "
                             f"{tuple(lse_split.shape)}")
        states, lses = attn_split, lse_split.movedim(-1, 2)
    else:
        states, lses = list(attn_split), list(lse_split)
        if len(states) != len(lses) or not states:
            raise ValueError(f"attn_split and lse_split must be as many chunks, at least one, got {len(states)} "
                             f"and {len(lses)}")
        if any(a.dim() not in (4, 5) or s.dim() != a.dim() - 1 for a, s in zip(states, lses)):
            raise ValueError("each chunk's attention must be (batch, seqlen, [groups,] heads, dim) and its lse "
                             "(batch, [groups,] heads, seqlen)")
        lses = [s.movedim(-1, 1) for s in lses]
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (
        [attn_split, lse_split] if stacked else [*attn_split, *lse_split]))
    if wants_grad and not write_lse:
        raise ValueError("write_lse must be True where the inputs require gradients")
    out, lse = merge_attention(states, lses, 0, impl=impl)
    out = out if output_dtype is None else out.to(output_dtype)
    return out, (lse.movedim(1, -1).contiguous() if write_lse else None)


def _no_dropout(p: float) -> None:
    if p != 0.0:
        raise NotImplementedError("dropout in the functions without autograd (as xformers'): call "
                                  "memory_efficient_attention for dropout")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, p: float, impl: str) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() not in (3, 4, 5) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"query, key and value must all be (batch, seqlen, [[groups,] heads,] dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"query, key and value must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"query, key and value must be on one device, got {q.device}, {k.device} and {v.device}")
    heads = q.shape[2:-1]
    if (k.shape[0] != q.shape[0] or v.shape[:-1] != k.shape[:-1] or k.shape[2:-1] != heads
            or k.shape[-1] != q.shape[-1]):
        raise ValueError(f"key must be (batch, seqlen_k, {', '.join(map(str, heads))}{', ' if heads else ''}"
                         f"{q.shape[-1]}) and value (batch, seqlen_k, ..., dim_v) for query {tuple(q.shape)}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)} (expand k and v yourself, as xformers asks)")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must lie in [0, 1), got {p}")
    if q.dtype == torch.float64 and impl != "reference":
        raise ValueError("query is float64: genfast's kernels take float32, float16 and bfloat16; impl='reference' "
                         "runs float64")


def _heads(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(batch, seqlen, heads, dim) forms; 5-d k and v expanded over each group's heads give one head
    a group, read in place (grouped-query attention)."""
    if q.dim() == 3:
        return q[:, :, None], k[:, :, None], v[:, :, None]
    if q.dim() == 4:
        return q, k, v
    if all(t.shape[3] == 1 or t.stride(3) == 0 for t in (k, v)):
        k, v = k[:, :, :, 0], v[:, :, :, 0]
    else:
        k, v = k.flatten(2, 3), v.flatten(2, 3)
    return q.flatten(2, 3), k, v


def _run(query, key, value, bias, p, scale, output_dtype, impl) -> Tuple[Tensor, Tensor]:
    _check_inputs(query, key, value, p, impl)
    q, k, v = _heads(query, key, value)
    tensor, diagonal = _tensor_bias(bias)
    if tensor is not None:
        _check_tensor_bias(tensor, query, key)
        if query.dim() == 3:
            tensor = tensor.unsqueeze(-3)
        elif query.dim() == 5:  # (batch, groups x heads, queries, keys), a view where it can be
            groups, heads = query.shape[2:4]
            tensor = tensor[:, :, 0] if tensor.shape[1:3] == (1, 1) else tensor.expand(
                tensor.shape[0], groups, heads, *tensor.shape[3:]).flatten(1, 2)
        o, lse = _masked(q, k, v, tensor, diagonal, None, None, p, scale, impl)
    elif bias is None:
        o, lse = _uniform(q, k, v, None, p, scale, impl)
    else:
        o, lse = _structured(q, k, v, bias, p, scale, impl)
    if query.dim() == 3:
        o = o[:, :, 0]
    elif query.dim() == 5:
        o, lse = o.unflatten(2, query.shape[2:4]), lse.unflatten(1, query.shape[2:4])
    return (o if output_dtype is None else o.to(output_dtype)), lse


def _tensor_bias(bias) -> Tuple[Optional[Tensor], Optional[str]]:
    """A tensor bias and the causal mask with it: a tensor alone, or LowerTriangularMaskWithTensorBias's
    (this module's or xformers')."""
    if isinstance(bias, Tensor):
        return bias, None
    if any(cls.__name__ == "LowerTriangularMaskWithTensorBias" for cls in type(bias).__mro__):
        return bias._bias, "top_left"
    return None, None


def _check_tensor_bias(bias: Tensor, query: Tensor, key: Tensor) -> None:
    """An additive bias of the inputs' dims: (batch, [[groups,] heads,] queries, keys), each dim that
    or 1 (xformers asks for the whole shape; a broadcast dim of size 1 cannot be misread)."""
    shape = (query.shape[0], *query.shape[2:-1], query.shape[1], key.shape[1])
    if bias.device != query.device:
        raise ValueError(f"attn_bias must be on query's device ({query.device}), got {bias.device}")
    if not bias.is_floating_point() or bias.dim() != len(shape) or any(
            n not in (1, m) for n, m in zip(bias.shape, shape)):
        raise ValueError(f"attn_bias must be an additive floating-point tensor {shape} (or 1 in a dim), got "
                         f"{bias.dtype} {tuple(bias.shape)}")


def _window(left: Optional[int], right: Optional[int]) -> Optional[Tuple[int, int]]:
    """A band around the bottom-right diagonal as genfast's window (None: no mask)."""
    if left is None and right is None:
        return None
    return (-1 if left is None else left, -1 if right is None else right)


def _uniform(q, k, v, window, p, scale, impl) -> Tuple[Tensor, Tensor]:
    """(batch, seqlen, heads, dim) attention as attention_varlen over the batch's rows: no copy."""
    batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    cu_q = _uniform_cu_seqlens(batch, lq, q.device)
    cu_k = cu_q if lk == lq else _uniform_cu_seqlens(batch, lk, q.device)
    o, lse = attention_varlen(q.reshape(batch * lq, *q.shape[2:]), k.reshape(batch * lk, *k.shape[2:]),
                              v.reshape(batch * lk, *v.shape[2:]), cu_q, cu_k, lq, lk, p, scale, window=window,
                              return_lse=True, impl=impl)
    return o.view(batch, lq, *o.shape[1:]), _batch_major(lse, batch, lq)


def _masked(q, k, v, mask, diagonal, left, right, p, scale, impl) -> Tuple[Tensor, Tensor]:
    """genfast.attention of the (batch, heads, seqlen, dim) views, with an additive or boolean mask and
    a band around the diagonal; the output made contiguous (batch, seqlen, heads, dim)."""
    lq, lk = q.shape[1], k.shape[1]
    causal, window = None, None
    if diagonal == "top_left":
        # xformers' top-left bands all end on the diagonal (right 0): genfast's top_left causal mask,
        # and the left bound as a window from the bottom-right diagonal
        causal = "top_left"
        if left is not None:
            if lk - lq + left < 0:
                raise ValueError(f"a local window of {left + 1} keys from the top-left diagonal leaves the last "
                                 f"queries of {lq} over {lk} keys without keys")
            window = (lk - lq + left, -1)
    else:
        window = _window(left, right)
    o, lse = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, p, scale=scale,
                       enable_gqa=True, causal=causal, window=window, return_lse=True, impl=impl)
    return o.transpose(1, 2).contiguous(), lse


def _structured(q, k, v, bias, p, scale, impl) -> Tuple[Tensor, Tensor]:
    diagonal, left, right = band(bias)
    if not hasattr(bias, "q_seqinfo"):
        if diagonal == "top_left" and q.shape[1] != k.shape[1]:
            return _masked(q, k, v, None, diagonal, left, right, p, scale, impl)
        return _uniform(q, k, v, _window(left, right), p, scale, impl)
    if q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(f"query, key and value must have batch size 1 with {type(bias).__name__} (sequences packed "
                         f"along seqlen), got query {tuple(q.shape)} and key {tuple(k.shape)}")
    q_info, k_info = bias.q_seqinfo, bias.k_seqinfo
    if q_info.seqstart.device != q.device or k_info.seqstart.device != q.device:
        raise ValueError(f"attn_bias's sequence starts must be on query's device ({q.device}), got "
                         f"{q_info.seqstart.device}: build it with device= or call attn_bias.to(device)")
    if q_info.seqstart_py[-1] != q.shape[1]:
        raise ValueError(f"query must have the {q_info.seqstart_py[-1]} rows attn_bias packs, got {q.shape[1]}")
    paged = hasattr(bias, "block_tables")
    if not paged and k_info.seqstart_py[-1] != k.shape[1]:
        raise ValueError(f"key must have the {k_info.seqstart_py[-1]} rows attn_bias packs, got {k.shape[1]}")
    if paged and bias.block_tables.device != q.device:
        raise ValueError(f"attn_bias's block_tables must be on query's device ({q.device}), got "
                         f"{bias.block_tables.device}")
    if paged and k.shape[1] % bias.page_size:  # (the pages the table names are the caller's to keep in range)
        raise ValueError(f"key must hold whole pages of attn_bias's page_size {bias.page_size}: its {k.shape[1]} rows "
                         "do not divide")
    if diagonal == "top_left" and q_info.seqstart_py != k_info.seqstart_py:
        return _block_by_block(q, k, v, bias, left, right, p, scale, impl)
    cu_k, used, table, keys, values = k_info.seqstart, None, None, k[0], v[0]
    if type(k_info).__name__ == "_GappySeqInfo":
        _check_gappy(bias, paged, k.shape[1])
        if paged or not _in_order(k_info):
            if p > 0.0 or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
                raise NotImplementedError(f"{type(bias).__name__} with blocks out of order, sharing keys or paged "
                                          "runs for inference: no dropout and no gradient")
            keys, values, table, cu_k = _key_rows(k, v, bias, paged)
        elif k_info.seqstart_py[0] > 0:  # keys before the first block: left out
            first = k_info.seqstart_py[0]
            keys, values, cu_k = k[0, first:], v[0, first:], k_info.seqstart - first
        used = None if table is not None else k_info.seqlen
    elif paged:
        keys, values = (t[0].unflatten(0, (-1, bias.page_size)) for t in (k, v))
        table = bias.block_tables.to(torch.int32)
        cu_k = _starts(k_info.seqlen)
    elif hasattr(k_info, "seqlen"):
        used = k_info.seqlen
    o, lse = attention_varlen(q[0], keys, values, q_info.seqstart, cu_k, max(q_info.max_seqlen, 0),
                              max(k_info.max_seqlen, 0), p, scale, window=_window(left, right), return_lse=True,
                              impl=impl, seqused_k=used, block_table=table)
    return o[None], lse[None]


def _starts(lengths: Tensor) -> Tensor:
    """cu_seqlens of sequences of these lengths, by device ops."""
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _check_gappy(bias, paged: bool, rows: int) -> None:
    """Each gappy block's keys within the keys (or its table row), read on the host."""
    starts, ends = bias.k_seqinfo.seqstart_py, bias.k_seqinfo.seqlen_py
    if paged:
        row = bias.block_tables.shape[1] * bias.page_size
        bounds = list(zip(starts, ends))
    else:
        row, bounds = rows, [(start, start + length) for start, length in zip(starts, ends)]
    for n, (start, end) in enumerate(bounds):
        if not 0 <= start <= end <= row:
            raise ValueError(f"attn_bias's block {n} has keys {start} .. {end}: each block's must lie in 0 .. {row}"
                             f"{' (its table row)' if paged else ' (the keys)'}")


def _in_order(k_info) -> bool:
    """Whether gappy keys' blocks follow one another without sharing keys (attention_varlen's
    seqused_k takes them, with gradients), read on the host."""
    starts, lengths = k_info.seqstart_py, k_info.seqlen_py
    return all(start + length <= after for start, length, after in zip(starts, lengths, starts[1:]))


def _key_rows(k, v, bias, paged) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gappy keys anywhere, or in a paged cache from a position in each table row, as
    attention_varlen's paged cache of one-row pages: (keys, values, block_table of each key's row,
    cu_seqlens_k), by device ops (inference, as a paged cache is)."""
    k_info = bias.k_seqinfo
    starts = k_info.seqstart[:-1]
    positions = starts[:, None] + torch.arange(max(k_info.max_seqlen, 1), device=starts.device,
                                               dtype=torch.int32)[None, :]
    if paged:
        tables, page_size = bias.block_tables, bias.page_size
        pages = tables.gather(1, (positions // page_size).clamp(0, tables.shape[1] - 1).long())
        rows, lengths = pages * page_size + positions % page_size, k_info.seqlen - starts
    else:
        rows, lengths = positions.clamp(0, max(k.shape[1] - 1, 0)), k_info.seqlen
    keys, values = (t[0].unflatten(0, (-1, 1)) for t in (k, v))
    return keys, values, rows.to(torch.int32), _starts(lengths)


def _block_by_block(q, k, v, bias, left, right, p, scale, impl) -> Tuple[Tensor, Tensor]:
    """Top-left causal blocks of queries and keys of other lengths: each block alone."""
    outputs, lses = [], []
    q_starts, k_starts = bias.q_seqinfo.seqstart_py, bias.k_seqinfo.seqstart_py  # lists: torch.compile reads them
    for q0, q1, k0, k1 in zip(q_starts, q_starts[1:], k_starts, k_starts[1:]):
        o, lse = _masked(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], None, "top_left", left, right, p, scale, impl)
        outputs.append(o)
        lses.append(lse)
    return torch.cat(outputs, 1), torch.cat(lses, 2)
