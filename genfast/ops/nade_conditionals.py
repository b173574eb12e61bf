"""torch.ops.genfast.nade_conditionals and its backward (native, from _C): fakes and the autograd
that links them. The public functions and the other backends come with the rest of the NADE
family."""

import torch

from .. import _backend


def _fake(x, W, c, V, b, ordering, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward_fake(grad_logits, x, W, c, V, b, ordering, activation):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (W, c, V, b, x))


def _setup_context(ctx, inputs, output):
    x, W, c, V, b, ordering, activation = inputs
    ctx.save_for_backward(x, W, c, V, b, ordering)
    ctx.activation = activation


def _backward(ctx, grad_logits):
    x, W, c, V, b, ordering = ctx.saved_tensors
    grad_W, grad_c, grad_V, grad_b, grad_x = torch.ops.genfast.nade_conditionals_backward(
        grad_logits, x, W, c, V, b, ordering, ctx.activation)
    return grad_x, grad_W, grad_c, grad_V, grad_b, None, None


if _backend.native_module() is not None:
    torch.library.register_fake("genfast::nade_conditionals")(_fake)
    torch.library.register_fake("genfast::nade_conditionals_backward")(_backward_fake)
    torch.library.register_autograd("genfast::nade_conditionals", _backward, setup_context=_setup_context)
