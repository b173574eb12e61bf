"""torch.ops.genfast.actnorm and actnorm_backward (native, from _C), their Triton forms
(custom_ops with explicit fakes), and the autograd that links each forward to its backward."""

import math
from typing import Tuple

import torch

from . import _trainable

Tensor = torch.Tensor
ROWS_PER_CHUNK_TARGET = 1 << 16  # elements of one channel summed per partial sum of the backward


def rows_per_chunk(rows: int, inner: int) -> int:
    """Samples per partial sum of the backward's reductions: fixed by the shape alone, so that the
    sums are the same on any number of threads."""
    return max(1, min(rows, ROWS_PER_CHUNK_TARGET // max(1, inner)))


def _fake(x, log_scale, bias, glow_order, inverse):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty(x.shape[0], dtype=torch.float32)


def _backward_fake(grad_y, grad_logdet, x, log_scale, bias, glow_order, inverse):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(log_scale),
            torch.empty_like(bias))


def _setup_context(ctx, inputs, output):
    x, log_scale, bias, glow_order, inverse = inputs
    ctx.save_for_backward(x, log_scale, bias)
    ctx.options = (glow_order, inverse)


def _make_backward(backward_op):
    def backward(ctx, grad_y, grad_logdet):
        x, log_scale, bias = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if grad_logdet is None:
            grad_logdet = x.new_zeros(x.shape[0], dtype=torch.float32)
        grad_x, grad_log_scale, grad_bias = backward_op(grad_y, grad_logdet.float(), x, log_scale, bias, *ctx.options)
        return grad_x.view_as(x), grad_log_scale, grad_bias, None, None

    return backward


def _as_bcs(t: Tensor) -> Tensor:
    """(B, C, S) contiguous."""
    return t.contiguous().view(t.shape[0], t.shape[1], -1)


def logdet_term(log_scale: Tensor, x: Tensor, inverse: bool) -> Tensor:
    """S * sum(log_scale), negated for the inverse, for every sample: float32, on x's device."""
    spatial = math.prod(x.shape[2:])
    total = log_scale.float().sum() * (-spatial if inverse else spatial)
    return total.expand(x.shape[0]).contiguous()


@torch.library.custom_op("genfast::actnorm_triton", mutates_args=())
def actnorm_triton(x: Tensor, log_scale: Tensor, bias: Tensor, glow_order: bool, inverse: bool) -> Tuple[Tensor, Tensor]:
    from ..kernels.actnorm import launch_actnorm

    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() > 0:
        x3 = _as_bcs(x)
        launch_actnorm(x3, log_scale.float().contiguous(), bias.float().contiguous(), y.view(x3.shape), glow_order,
                       inverse)
    return y, logdet_term(log_scale, x, inverse)


@torch.library.custom_op("genfast::actnorm_backward_triton", mutates_args=())
def actnorm_backward_triton(grad_y: Tensor, grad_logdet: Tensor, x: Tensor, log_scale: Tensor, bias: Tensor,
                            glow_order: bool, inverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from ..kernels.actnorm import launch_actnorm_backward

    x3 = _as_bcs(x)
    rows, channels, inner = x3.shape
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    per_chunk = rows_per_chunk(rows, inner)
    num_chunks = -(-rows // per_chunk) if rows else 0
    partial_ls = torch.zeros(num_chunks, channels, dtype=torch.float32, device=x.device)
    partial_b = torch.zeros_like(partial_ls)
    if x.numel() > 0:
        launch_actnorm_backward(_as_bcs(grad_y), x3, log_scale.float().contiguous(), bias.float().contiguous(),
                                grad_x.view(x3.shape), partial_ls, partial_b, per_chunk, glow_order, inverse)
    return (grad_x,) + finish_parameter_grads(partial_ls, partial_b, grad_logdet, log_scale, bias, x, inverse)


def finish_parameter_grads(partial_ls, partial_b, grad_logdet, log_scale, bias, x, inverse):
    """The chunks' sums added in order, plus the logdet's share of the log_scale gradient."""
    spatial = math.prod(x.shape[2:])
    from_logdet = grad_logdet.float().sum() * (-spatial if inverse else spatial)
    grad_ls = partial_ls.sum(0) + from_logdet
    return grad_ls.to(log_scale.dtype), partial_b.sum(0).to(bias.dtype)


_trainable.register("actnorm", _fake, _backward_fake, _setup_context, _make_backward, actnorm_triton,
                    actnorm_backward_triton)


def operator(impl: str):
    return _trainable.operator("actnorm", impl)
