"""torch.ops.genfast.attention_forward and attention_backward (native, from _C): their fakes, and
the autograd that links them (gradients to q, k, v and an additive attn_mask)."""

import torch

from .. import _backend


def _fake(q, k, v, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p, generator, seed, offset):
    o = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    return o, q.new_empty(q.shape[:3], dtype=torch.float32)


def _backward_fake(grad_o, grad_lse, q, k, v, o, lse, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi,
                   dropout_p, seed, offset, grad_mask):
    grad_s = q.new_empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.float32) if grad_mask else None
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_s


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p, generator, seed, offset = inputs
    if generator is not None:
        raise NotImplementedError("attention's backward replays dropout from (seed, offset); a CUDA generator's "
                                  "key is not recorded yet")
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, attn_mask, alibi_slopes)
    ctx.options = (scale, softcap, band_lo, band_hi, dropout_p, seed, offset)
    ctx.mask_needs_grad = attn_mask is not None and attn_mask.requires_grad


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, attn_mask, alibi_slopes = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    grad_q, grad_k, grad_v, grad_s = torch.ops.genfast.attention_backward(
        grad_o, grad_lse, q, k, v, o, lse, attn_mask, alibi_slopes, *ctx.options, ctx.mask_needs_grad)
    grad_mask = None
    if ctx.mask_needs_grad:
        grad_mask = grad_s.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    return grad_q, grad_k, grad_v, grad_mask, None, None, None, None, None, None, None, None, None


if _backend.native_module() is not None:
    torch.library.register_fake("genfast::attention_forward")(_fake)
    torch.library.register_fake("genfast::attention_backward")(_backward_fake)
    torch.library.register_autograd("genfast::attention_forward", _backward, setup_context=_setup_context)
