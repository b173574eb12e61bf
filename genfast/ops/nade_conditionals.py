"""torch.ops.genfast.nade_conditionals and nade_conditionals_backward (native, from _C), their
Triton forms (custom_ops with explicit fakes, on every device), and the autograd that links each
forward to its backward kernel."""

from typing import Optional, Tuple

import torch

from . import _trainable

Tensor = torch.Tensor


def _fake(x, W, c, V, b, ordering, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward_fake(grad_logits, x, W, c, V, b, ordering, activation):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (W, c, V, b, x))


def _setup_context(ctx, inputs, output):
    x, W, c, V, b, ordering, activation = inputs
    ctx.save_for_backward(x, W, c, V, b, ordering)
    ctx.activation = activation


def _make_backward(backward_op):
    def backward(ctx, grad_logits):
        x, W, c, V, b, ordering = ctx.saved_tensors
        grad_W, grad_c, grad_V, grad_b, grad_x = backward_op(grad_logits, x, W, c, V, b, ordering, ctx.activation)
        return grad_x, grad_W, grad_c, grad_V, grad_b, None, None

    return backward


def kernel_params(W, c, V, b):
    """The parameters as the kernels read them: float32, contiguous, W transposed to (D, H)."""
    return (W.float().t().contiguous(), c.float().contiguous(), V.float().contiguous(), b.float().contiguous())


def kernel_ordering(ordering: Optional[Tensor]):
    """(ordering or None, whether it has one row per sample)."""
    if ordering is None:
        return None, False
    return ordering.contiguous(), ordering.dim() == 2


@torch.library.custom_op("genfast::nade_conditionals_triton", mutates_args=())
def nade_conditionals_triton(x: Tensor, W: Tensor, c: Tensor, V: Tensor, b: Tensor, ordering: Optional[Tensor],
                             activation: str) -> Tensor:
    from ..kernels.nade import launch_nade_conditionals

    logits = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() > 0:
        launch_nade_conditionals(x.contiguous(), *kernel_params(W, c, V, b), *kernel_ordering(ordering),
                                 activation == "relu", logits)
    return logits


@torch.library.custom_op("genfast::nade_conditionals_backward_triton", mutates_args=())
def nade_conditionals_backward_triton(grad_logits: Tensor, x: Tensor, W: Tensor, c: Tensor, V: Tensor, b: Tensor,
                                      ordering: Optional[Tensor], activation: str
                                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.nade import launch_nade_conditionals_backward

    (batch, dims), hidden = x.shape, W.shape[0]
    floats = dict(dtype=torch.float32, device=x.device)
    grad_w_t, grad_V = torch.zeros(dims, hidden, **floats), torch.zeros(dims, hidden, **floats)
    grad_b, grad_c, grad_x = torch.zeros(dims, **floats), torch.zeros(hidden, **floats), torch.zeros(batch, dims, **floats)
    if x.numel() > 0:
        launch_nade_conditionals_backward(grad_logits.to(x.dtype).contiguous(), x.contiguous(),
                                          *kernel_params(W, c, V, b), *kernel_ordering(ordering),
                                          activation == "relu", grad_w_t, grad_V, grad_b, grad_c, grad_x)
    return (grad_w_t.t().contiguous().to(W.dtype), grad_c.to(c.dtype), grad_V.to(V.dtype), grad_b.to(b.dtype),
            grad_x.to(x.dtype))


_trainable.register("nade_conditionals", _fake, _backward_fake, _setup_context, _make_backward,
                    nade_conditionals_triton, nade_conditionals_backward_triton)


def operator(impl: str):
    return _trainable.operator("nade_conditionals", impl)
