"""torch.ops.genfast.attention_forward and attention_backward (native, from _C), their packed
variable-length forms attention_varlen_forward and attention_varlen_backward, the Triton forms of
all four (custom_ops with explicit fakes, on every device), and the autograd that links each forward
to its backward (gradients to q, k, v, an additive attn_mask, the sinks and the log-sum-exp)."""

from typing import Optional, Tuple

import torch

from .. import _backend

Tensor = torch.Tensor


def _fake(q, k, v, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p, seed, offset,
          deterministic=False, float_o=False, sinks=None, qv=None):
    o = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=torch.float32 if float_o else q.dtype)
    return o, q.new_empty(q.shape[:3], dtype=torch.float32)


def _mask_grad_shape(attn_mask, q, k, keys_summed=True):
    """The backward's dS with grad_mask: (B, H, Lq, Lk), with 1 for each of B, H and Lq (and Lk, when
    keys_summed) where the mask (right-aligned) has 1 or no dim, dS being summed over those. The
    kernels add dS up over B, H and Lq as they go, in less memory than (B, H, Lq, Lk); the keys are
    summed afterwards, in float32 as the rest, before the result is rounded to the mask's dtype."""
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_mask is None:
        return full
    sizes = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    summed = 4 if keys_summed else 3
    return tuple(1 if size == 1 and d < summed else whole for d, (size, whole) in enumerate(zip(sizes, full)))


def _mask_grad_dtype(attn_mask):
    """dS's dtype: an additive mask's own (its gradient), else float32."""
    return attn_mask.dtype if attn_mask is not None and attn_mask.is_floating_point() else torch.float32


def _backward_fake(grad_o, grad_lse, q, k, v, o, lse, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi,
                   dropout_p, seed, offset, grad_mask, deterministic=False, sinks=None):
    grad_s = q.new_empty(_mask_grad_shape(attn_mask, q, k), dtype=_mask_grad_dtype(attn_mask)) if grad_mask else None
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_s, _sinks_grad_fake(sinks)


def _sinks_grad_fake(sinks):
    return None if sinks is None else sinks.new_empty(sinks.shape)


def _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, scale, softcap,
                 band_lo, band_hi, dropout_p, seed, offset, deterministic=False, sinks=None, seqused_k=None,
                 block_table=None, qv=None):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


def _varlen_backward_fake(grad_o, grad_lse, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p, seed, offset, deterministic=False,
                          sinks=None, seqused_k=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), _sinks_grad_fake(sinks)


# The Triton ops' autograd. Their inputs' positions: q, k, v, attn_mask, alibi_slopes, then the
# options scale .. offset, deterministic, float_o, sinks and qv (the last four when given).
_SINKS_OPTION = 9
_QV_HINT = " (genfast.attention{} gives qv gradients through the concatenation it stands for)"


def _refuse_inference_only(op, t, what, hint=""):
    if t is not None:
        raise RuntimeError(f"{op}: {what} serves inference and has no backward here; call it under torch.no_grad() "
                           f"or with inputs that do not require grad{hint}")


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, alibi_slopes, *options = inputs
    o, lse = output
    sinks, qv = (options[_SINKS_OPTION:] + [None] * 2)[:2]
    _refuse_inference_only("genfast.attention_forward", qv, "qv", _QV_HINT.format(""))
    ctx.save_for_backward(q, k, v, o, lse, attn_mask, alibi_slopes, sinks)
    ctx.options = tuple(options[:7])  # scale .. offset
    ctx.deterministic = bool(options[7]) if len(options) > 7 else False
    ctx.non_tensor_inputs = 1 + len(options)  # alibi_slopes (no gradient) and the options
    ctx.mask_needs_grad = attn_mask is not None and attn_mask.requires_grad


def mask_alike_along_keys(attn_mask, sinks) -> bool:
    """Whether the additive mask's gradient takes _mask_grad_without_keys: constant along the keys
    (its key dim 1), without sinks."""
    return sinks is None and (attn_mask.dim() == 0 or attn_mask.shape[-1] == 1)


def _mask_grad_without_keys(attn_mask, grad_o, grad_lse, o, lse):
    """The gradient of an additive mask constant along the keys (its key dim 1), without sinks: a
    row's bias shifts all its scores alike, which moves no probability, so only the row's lse moves,
    one for one: the gradient is grad_lse summed over the rows the mask spans (0 for a row without
    keys). Exact, where summing the kernels' dS = P (dP - delta) over the keys leaves each row a
    rounding residual of delta's, which a mask spanning many rows adds up (genfast check --fuzz, seed
    123058: a scalar bias, 4590 rows). NaN in o, grad_o or lse propagates as the kernels' would. The
    native ops' autograd has the same in C++ (csrc/attention_autograd.cpp)."""
    from_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float()
    nan_guard = ((grad_o.float() * o.float()).sum(-1) + torch.where(lse == float("-inf"), 0.0, lse)) * 0.0
    rows = torch.where(lse == float("-inf"), 0.0, from_lse) + nan_guard
    return rows[..., None].sum_to_size(attn_mask.shape).to(attn_mask.dtype)


def _make_backward(backward_op):
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse, attn_mask, alibi_slopes, sinks = ctx.saved_tensors
        grads_o = torch.zeros_like(o) if grad_o is None else grad_o
        keys_alike = ctx.mask_needs_grad and mask_alike_along_keys(attn_mask, sinks)
        grad_q, grad_k, grad_v, grad_s, grad_sinks = backward_op(grads_o, grad_lse, q, k, v, o, lse, attn_mask,
                                                                 alibi_slopes, *ctx.options,
                                                                 ctx.mask_needs_grad and not keys_alike,
                                                                 ctx.deterministic, sinks)
        if keys_alike:
            grad_mask = _mask_grad_without_keys(attn_mask, grads_o, grad_lse, o, lse)
        else:
            grad_mask = grad_s.sum_to_size(attn_mask.shape) if ctx.mask_needs_grad else None  # the mask's dtype
        grads = [grad_q, grad_k, grad_v, grad_mask] + [None] * ctx.non_tensor_inputs
        if sinks is not None and ctx.needs_input_grad[5 + _SINKS_OPTION]:
            grads[5 + _SINKS_OPTION] = grad_sinks
        return tuple(grads)

    return backward


_VARLEN_SINKS_OPTION = 8  # after scale .. offset and deterministic


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, *options = inputs
    o, lse = output
    sinks, seqused_k, block_table, qv = (options[_VARLEN_SINKS_OPTION:] + [None] * 4)[:4]
    _refuse_inference_only("genfast.attention_varlen_forward", block_table, "a paged KV cache (block_table)")
    _refuse_inference_only("genfast.attention_varlen_forward", qv, "qv", _QV_HINT.format("_varlen"))
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks, seqused_k)
    ctx.options = (max_seqlen_q, max_seqlen_k)
    ctx.after_alibi = tuple(options[:_VARLEN_SINKS_OPTION])  # scale .. deterministic: the backward's own order
    ctx.non_tensor_inputs = 5 + len(options)


def _make_varlen_backward(backward_op):
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks, seqused_k = ctx.saved_tensors
        grads_o = torch.zeros_like(o) if grad_o is None else grad_o
        grad_q, grad_k, grad_v, grad_sinks = backward_op(grads_o, grad_lse, q, k, v, o, lse, cu_seqlens_q,
                                                         cu_seqlens_k, *ctx.options, alibi_slopes, *ctx.after_alibi,
                                                         sinks, seqused_k)
        grads = [grad_q, grad_k, grad_v] + [None] * ctx.non_tensor_inputs
        if sinks is not None and ctx.needs_input_grad[8 + _VARLEN_SINKS_OPTION]:
            grads[8 + _VARLEN_SINKS_OPTION] = grad_sinks
        return tuple(grads)

    return backward


def _triton_mask(attn_mask, q, k):
    """The mask expanded to (B, H, Lq, Lk): a bool one as uint8; an additive one in float32, float16 or
    bfloat16 as it is (the interpreter, which has no bfloat16, reads a float32 copy), else float32."""
    if attn_mask is None:
        return None, False
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    is_bool = attn_mask.dtype == torch.bool
    if is_bool:
        return attn_mask.view(torch.uint8).expand(full), True
    as_is = attn_mask.dtype in (torch.float32, torch.float16) or (
        attn_mask.dtype == torch.bfloat16 and attn_mask.device.type != "cpu")
    return (attn_mask if as_is else attn_mask.float()).expand(full), False


def _float_slopes(alibi_slopes):
    return None if alibi_slopes is None else alibi_slopes.float().contiguous()


def _triton_delta(grad_o, o, grad_lse, varlen: bool):
    """rowsum(grad_o * o) - grad_lse, float32 in lse's layout."""
    from ..kernels.attention import launch_attention_row_deltas

    shape = (o.shape[1], o.shape[0]) if varlen else o.shape[:3]
    delta = torch.empty(shape, dtype=torch.float32, device=o.device)
    launch_attention_row_deltas(grad_o, o, grad_lse, delta, varlen=True if varlen else None)
    return delta


def _sinks_grad(delta, lse, sinks, float_sinks, varlen: bool):
    """The gradient of sinks (float_sinks as _float_sinks gives them) in their dtype from the backward's
    delta (csrc/attention_args.h's attention_sink_grad, which the native ops use): d sink_h = -sum over
    the rows r of head h of e^(sink_h - lse_r) delta_r; None without sinks."""
    if sinks is None:
        return None
    sink = float_sinks.view((-1, 1) if varlen else (1, -1, 1))
    # lse >= sink, so the weight is at most 1; lse = -inf only where the sink is -inf too: weight 0.
    weight = torch.where(lse == float("-inf"), torch.zeros_like(lse), torch.exp(sink - lse))
    return (-(weight * delta).sum(1 if varlen else (0, 2))).to(sinks.dtype)


def _float_sinks(sinks, q):
    """The sinks as the kernels read them, float32 (heads,) contiguous, checked as the native ops check them."""
    if sinks is None:
        return None
    heads = q.shape[1]
    if tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks must have shape (heads,) = ({heads},), got {tuple(sinks.shape)}")
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be floating point, got {sinks.dtype}")
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device ({q.device}), got {sinks.device}")
    return sinks.float().contiguous()


def _triton_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k):
    """The Triton launchers' varlen argument, seqused_k checked as the native ops check it (its values
    are not read: that would synchronize with the GPU)."""
    if seqused_k is not None:
        batch = cu_seqlens_k.shape[0] - 1
        if seqused_k.shape != (batch,) or seqused_k.dtype != torch.int32:
            raise ValueError(f"seqused_k must be int32 of shape (batch,) = ({batch},), got {seqused_k.dtype} "
                             f"{tuple(seqused_k.shape)}")
        if seqused_k.device != cu_seqlens_k.device:
            raise ValueError(f"seqused_k must be on q's device ({cu_seqlens_k.device}), got {seqused_k.device}")
        seqused_k = seqused_k.contiguous()
    return cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k, seqused_k


def check_qv(qv, q, v):
    """Raises unless qv is None or q's shape with v's head dim, in q's dtype and on its device, naming
    it; else returns it."""
    want = tuple(q.shape[:-1]) + tuple(v.shape[-1:])
    if qv is not None and (not isinstance(qv, Tensor) or tuple(qv.shape) != want or qv.dtype != q.dtype
                           or qv.device != q.device):
        got = f"{qv.dtype} {tuple(qv.shape)} on {qv.device}" if isinstance(qv, Tensor) else type(qv).__name__
        raise ValueError(f"qv must be q's shape with v's head dim, {want}, in q's dtype ({q.dtype}) on its device "
                         f"({q.device}); got {got}")
    return qv


def check_paged_cache(block_table, k, v, batch, max_seqlen_k, dropout_p):
    """Raises on a bad paged KV cache, naming the argument, as the native ops check it (the table's
    values are not read: that would synchronize with a GPU); else returns block_table contiguous."""
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"with block_table, {name} must be a paged cache (pages, page_size, kv_heads, head_dim), "
                             f"got {tuple(t.shape)}")
    if k.shape[:2] != v.shape[:2] or k.shape[1] == 0:
        raise ValueError(f"a paged cache's k and v must hold as many pages of one page size (k.shape[1]), at least "
                         f"1; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if (not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2
            or block_table.shape[0] != batch or block_table.device != k.device):
        got = f"{getattr(block_table, 'dtype', type(block_table).__name__)} {tuple(getattr(block_table, 'shape', ()))}"
        raise ValueError(f"block_table must be an int32 tensor (batch, pages per sequence) with batch = {batch} on "
                         f"the cache's device ({k.device}), got {got}")
    if max_seqlen_k > block_table.shape[1] * k.shape[1]:
        raise ValueError(f"block_table's rows hold {block_table.shape[1]} pages of {k.shape[1]} keys, fewer than "
                         f"max_seqlen_k ({max_seqlen_k})")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0 with block_table (a paged KV cache serves inference), got {dropout_p}")
    return block_table.contiguous()


def _or_not_asked(t, q):
    """A custom_op returns no optional tensor: an empty one stands for "not asked"."""
    return q.new_empty(0) if t is None else t


def _float_grads(*tensors):
    return tuple(torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in tensors)


@torch.library.custom_op("genfast::attention_forward_triton", mutates_args=())
def attention_forward_triton(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                             alibi_slopes: Optional[Tensor], scale: float, softcap: float, band_lo: int, band_hi: int,
                             dropout_p: float, seed: int, offset: int,
                             deterministic: bool = False, float_o: bool = False,
                             sinks: Optional[Tensor] = None, qv: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    from ..kernels.attention import launch_attention_forward

    o, lse = _fake(q, k, v, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p, seed, offset,
                   float_o=float_o)
    mask, is_bool = _triton_mask(attn_mask, q, k)
    launch_attention_forward(q, k, v, mask, is_bool, _float_slopes(alibi_slopes), scale, softcap, band_lo, band_hi,
                             dropout_p, seed, offset, o, lse, sinks=_float_sinks(sinks, q), qv=check_qv(qv, q, v))
    return o, lse


@torch.library.custom_op("genfast::attention_backward_triton", mutates_args=())
def attention_backward_triton(grad_o: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                              lse: Tensor, attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor], scale: float,
                              softcap: float, band_lo: int, band_hi: int, dropout_p: float, seed: int, offset: int,
                              grad_mask: bool, deterministic: bool = False,
                              sinks: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.attention import launch_attention_backward, launch_attention_forward

    mask, is_bool = _triton_mask(attn_mask, q, k)
    slopes = _float_slopes(alibi_slopes)
    float_sinks = _float_sinks(sinks, q)
    if grad_mask and q.dtype != torch.float32 and o.dtype != torch.float32:
        # delta from the forward's float32 o, recomputed: csrc/cpu/attention.cpp's backward says why.
        o = torch.empty(o.shape, dtype=torch.float32, device=o.device)
        launch_attention_forward(q, k, v, mask, is_bool, slopes, scale, softcap, band_lo, band_hi, dropout_p, seed,
                                 offset, o, torch.empty_like(lse), sinks=float_sinks)
    delta = _triton_delta(grad_o, o, grad_lse, varlen=False)
    grad_q, grad_k, grad_v = _float_grads(q, k, v)
    grad_s = (torch.zeros(_mask_grad_shape(attn_mask, q, k, keys_summed=False), dtype=torch.float32,
                          device=q.device) if grad_mask else None)
    launch_attention_backward(grad_o.contiguous(), delta, q, k, v, lse.contiguous(), mask, is_bool, slopes, scale,
                              softcap, band_lo, band_hi, dropout_p, seed, offset, grad_q, grad_k, grad_v, grad_s,
                              deterministic=deterministic)
    grad_mask_shaped = (grad_s.sum_to_size(_mask_grad_shape(attn_mask, q, k)).to(_mask_grad_dtype(attn_mask))
                        if grad_mask else None)
    return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), _or_not_asked(grad_mask_shaped, q),
            _or_not_asked(_sinks_grad(delta, lse, sinks, float_sinks, varlen=False), q))


def _triton_backward_fake(grad_o, grad_lse, q, k, v, o, lse, attn_mask, alibi_slopes, scale, softcap, band_lo,
                          band_hi, dropout_p, seed, offset, grad_mask, deterministic=False, sinks=None):
    grad_q, grad_k, grad_v, grad_s, grad_sinks = _backward_fake(grad_o, grad_lse, q, k, v, o, lse, attn_mask,
                                                                alibi_slopes, scale, softcap, band_lo, band_hi,
                                                                dropout_p, seed, offset, grad_mask, sinks=sinks)
    return grad_q, grad_k, grad_v, _or_not_asked(grad_s, q), _or_not_asked(grad_sinks, q)


@torch.library.custom_op("genfast::attention_varlen_forward_triton", mutates_args=())
def attention_varlen_forward_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, alibi_slopes: Optional[Tensor],
                                    scale: float, softcap: float, band_lo: int, band_hi: int, dropout_p: float,
                                    seed: int, offset: int, deterministic: bool = False,
                                    sinks: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None,
                                    block_table: Optional[Tensor] = None,
                                    qv: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    from ..kernels.attention import launch_attention_forward

    o, lse = _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, scale,
                          softcap, band_lo, band_hi, dropout_p, seed, offset)
    varlen = _triton_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k)
    if block_table is not None:
        varlen += (check_paged_cache(block_table, k, v, cu_seqlens_k.shape[0] - 1, max_seqlen_k, dropout_p),)
    launch_attention_forward(q, k, v, None, False, _float_slopes(alibi_slopes), scale, softcap, band_lo, band_hi,
                             dropout_p, seed, offset, o, lse, varlen=varlen, sinks=_float_sinks(sinks, q),
                             qv=check_qv(qv, q, v))
    return o, lse


@torch.library.custom_op("genfast::attention_varlen_backward_triton", mutates_args=())
def attention_varlen_backward_triton(grad_o: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                                     o: Tensor, lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                     max_seqlen_q: int, max_seqlen_k: int, alibi_slopes: Optional[Tensor],
                                     scale: float, softcap: float, band_lo: int, band_hi: int, dropout_p: float,
                                     seed: int, offset: int, deterministic: bool = False,
                                     sinks: Optional[Tensor] = None,
                                     seqused_k: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.attention import launch_attention_backward

    float_sinks = _float_sinks(sinks, q)
    delta = _triton_delta(grad_o, o, grad_lse, varlen=True)
    grad_q, grad_k, grad_v = _float_grads(q, k, v)
    varlen = _triton_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k)
    launch_attention_backward(grad_o.contiguous(), delta, q, k, v, lse.contiguous(), None, False,
                              _float_slopes(alibi_slopes), scale, softcap, band_lo, band_hi, dropout_p, seed, offset,
                              grad_q, grad_k, grad_v, None, varlen=varlen, deterministic=deterministic)
    grad_sinks = _sinks_grad(delta, lse, sinks, float_sinks, varlen=True)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), _or_not_asked(grad_sinks, q)


def _triton_varlen_backward_fake(*args, **kwargs):
    grad_q, grad_k, grad_v, grad_sinks = _varlen_backward_fake(*args, **kwargs)
    return grad_q, grad_k, grad_v, _or_not_asked(grad_sinks, grad_q)


attention_forward_triton.register_fake(_fake)
attention_backward_triton.register_fake(_triton_backward_fake)
attention_varlen_forward_triton.register_fake(_varlen_fake)
attention_varlen_backward_triton.register_fake(_triton_varlen_backward_fake)
torch.library.register_autograd("genfast::attention_forward_triton", _make_backward(attention_backward_triton),
                                setup_context=_setup_context)
torch.library.register_autograd("genfast::attention_varlen_forward_triton",
                                _make_varlen_backward(attention_varlen_backward_triton),
                                setup_context=_varlen_setup_context)
if _backend.native_module() is not None:
    torch.library.register_fake("genfast::attention_forward")(_fake)
    torch.library.register_fake("genfast::attention_backward")(_backward_fake)
    torch.library.register_fake("genfast::attention_varlen_forward")(_varlen_fake)
    torch.library.register_fake("genfast::attention_varlen_backward")(_varlen_backward_fake)
    # Their autograd is registered in C++ (csrc/attention_autograd.cpp): no Python layer per call.
