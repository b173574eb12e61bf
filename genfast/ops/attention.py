"""torch.ops.genfast.attention_forward and attention_backward (native, from _C), their Triton forms
(custom_ops with explicit fakes, on every device), and the autograd that links each forward to its
backward (gradients to q, k, v, an additive attn_mask and the log-sum-exp)."""

from typing import Optional, Tuple

import torch

from .. import _backend

Tensor = torch.Tensor


def _fake(q, k, v, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p, *key):
    o = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    return o, q.new_empty(q.shape[:3], dtype=torch.float32)


def _backward_fake(grad_o, grad_lse, q, k, v, o, lse, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi,
                   dropout_p, seed, offset, grad_mask):
    grad_s = q.new_empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.float32) if grad_mask else None
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_s


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p, *key = inputs
    ctx.num_key_args = len(key)
    if len(key) == 3:  # the native form: generator, seed, offset
        if key[0] is not None:
            raise NotImplementedError("attention's backward replays dropout from (seed, offset); a CUDA generator's "
                                      "key is not recorded yet")
        key = key[1:]
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, attn_mask, alibi_slopes)
    ctx.options = (scale, softcap, band_lo, band_hi, dropout_p, *key)
    ctx.mask_needs_grad = attn_mask is not None and attn_mask.requires_grad


def _make_backward(backward_op):
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse, attn_mask, alibi_slopes = ctx.saved_tensors
        if grad_o is None:
            grad_o = torch.zeros_like(o)
        grad_q, grad_k, grad_v, grad_s = backward_op(grad_o, grad_lse, q, k, v, o, lse, attn_mask, alibi_slopes,
                                                     *ctx.options, ctx.mask_needs_grad)
        grad_mask = grad_s.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if ctx.mask_needs_grad else None
        return (grad_q, grad_k, grad_v, grad_mask) + (None,) * (6 + ctx.num_key_args)

    return backward


def _triton_mask(attn_mask, q, k):
    if attn_mask is None:
        return None, False
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    is_bool = attn_mask.dtype == torch.bool
    return attn_mask.to(torch.uint8 if is_bool else torch.float32).expand(full), is_bool


@torch.library.custom_op("genfast::attention_forward_triton", mutates_args=())
def attention_forward_triton(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                             alibi_slopes: Optional[Tensor], scale: float, softcap: float, band_lo: int, band_hi: int,
                             dropout_p: float, seed: int, offset: int) -> Tuple[Tensor, Tensor]:
    from ..kernels.attention import launch_attention_forward

    o = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    mask, is_bool = _triton_mask(attn_mask, q, k)
    slopes = None if alibi_slopes is None else alibi_slopes.float().contiguous()
    launch_attention_forward(q, k, v, mask, is_bool, slopes, scale, softcap, band_lo, band_hi, dropout_p, seed, offset,
                             o, lse)
    return o, lse


@torch.library.custom_op("genfast::attention_backward_triton", mutates_args=())
def attention_backward_triton(grad_o: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                              lse: Tensor, attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor], scale: float,
                              softcap: float, band_lo: int, band_hi: int, dropout_p: float, seed: int, offset: int,
                              grad_mask: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.attention import launch_attention_backward

    delta = (grad_o.float() * o.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    floats = dict(dtype=torch.float32, device=q.device)
    grad_q, grad_k, grad_v = (torch.zeros(t.shape, **floats) for t in (q, k, v))
    grad_s = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], **floats) if grad_mask else None
    mask, is_bool = _triton_mask(attn_mask, q, k)
    slopes = None if alibi_slopes is None else alibi_slopes.float().contiguous()
    launch_attention_backward(grad_o.contiguous(), delta.contiguous(), q, k, v, lse.contiguous(), mask, is_bool, slopes,
                              scale, softcap, band_lo, band_hi, dropout_p, seed, offset, grad_q, grad_k, grad_v, grad_s)
    # A custom_op returns no optional tensor: an empty one stands for "not asked".
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_s if grad_mask else q.new_empty(0)


def _triton_backward_fake(grad_o, grad_lse, q, k, v, o, lse, attn_mask, alibi_slopes, scale, softcap, band_lo,
                          band_hi, dropout_p, seed, offset, grad_mask):
    grad_q, grad_k, grad_v, grad_s = _backward_fake(grad_o, grad_lse, q, k, v, o, lse, attn_mask, alibi_slopes, scale,
                                                    softcap, band_lo, band_hi, dropout_p, seed, offset, grad_mask)
    return grad_q, grad_k, grad_v, grad_s if grad_mask else q.new_empty(0)


attention_forward_triton.register_fake(_fake)
attention_backward_triton.register_fake(_triton_backward_fake)
torch.library.register_autograd("genfast::attention_forward_triton", _make_backward(attention_backward_triton),
                                setup_context=_setup_context)
if _backend.native_module() is not None:
    torch.library.register_fake("genfast::attention_forward")(_fake)
    torch.library.register_fake("genfast::attention_backward")(_backward_fake)
    torch.library.register_autograd("genfast::attention_forward",
                                    _make_backward(torch.ops.genfast.attention_backward), setup_context=_setup_context)
