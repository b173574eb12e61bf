"""torch.ops.genfast.affine_coupling and affine_coupling_backward (native, from _C), their Triton
forms (custom_ops with explicit fakes, on every device), and the autograd that links each
forward to its backward kernel."""

import math
from typing import Tuple

import torch

from . import _trainable
from ..reference.flows import SCALE_FNS

Tensor = torch.Tensor


def rows_view(t: Tensor, rows: int) -> Tensor:
    """t as (rows, elements per row) with contiguous rows (any row stride): a view when it can be."""
    v = t.reshape(rows, math.prod(t.shape[1:]))
    return v if v.shape[1] <= 1 or v.stride(1) == 1 else v.contiguous()


def _fake(x, shift, scale, index, scale_fn, scale_param, glow_order, inverse):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty(x.shape[0], dtype=torch.float32)


def _backward_fake(grad_y, grad_logdet, x, shift, scale, index, scale_fn, scale_param, glow_order, inverse):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, shift, scale))


def _setup_context(ctx, inputs, output):
    x, shift, scale, index, scale_fn, scale_param, glow_order, inverse = inputs
    ctx.save_for_backward(x, shift, scale, index)
    ctx.options = (scale_fn, scale_param, glow_order, inverse)


def _make_backward(backward_op):
    def backward(ctx, grad_y, grad_logdet):
        x, shift, scale, index = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if grad_logdet is None:
            grad_logdet = x.new_zeros(x.shape[0], dtype=torch.float32)
        grad_x, grad_shift, grad_scale = backward_op(grad_y, grad_logdet.float(), x, shift, scale, index,
                                                     *ctx.options)
        return grad_x.view_as(x), grad_shift.view_as(shift), grad_scale.view_as(scale), None, None, None, None, None

    return backward


@torch.library.custom_op("genfast::affine_coupling_triton", mutates_args=())
def affine_coupling_triton(x: Tensor, shift: Tensor, scale: Tensor, index: Tensor, scale_fn: str, scale_param: float,
                           glow_order: bool, inverse: bool) -> Tuple[Tensor, Tensor]:
    from ..kernels.affine_coupling import CHUNK, launch_affine_coupling

    rows = x.shape[0]
    x2, t2, u2 = rows_view(x, rows), rows_view(shift, rows), rows_view(scale, rows)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    partial = torch.zeros(rows, max(1, -(-x2.shape[1] // CHUNK)), dtype=torch.float32, device=x.device)
    launch_affine_coupling(x2, t2, u2, index, y.view(x2.shape), partial, SCALE_FNS.index(scale_fn), scale_param,
                           glow_order, inverse, t2.shape[1] == x2.shape[1])
    return y, partial.sum(1)


@torch.library.custom_op("genfast::affine_coupling_backward_triton", mutates_args=())
def affine_coupling_backward_triton(grad_y: Tensor, grad_logdet: Tensor, x: Tensor, shift: Tensor, scale: Tensor,
                                    index: Tensor, scale_fn: str, scale_param: float, glow_order: bool,
                                    inverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from ..kernels.affine_coupling import launch_affine_coupling_backward

    rows = x.shape[0]
    x2, t2, u2 = rows_view(x, rows), rows_view(shift, rows), rows_view(scale, rows)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, shift, scale)]
    launch_affine_coupling_backward(rows_view(grad_y, rows), grad_logdet.contiguous(), x2, t2, u2, index,
                                    *(rows_view(g, rows) for g in grads), SCALE_FNS.index(scale_fn), scale_param,
                                    glow_order, inverse, t2.shape[1] == x2.shape[1])
    return tuple(grads)


_trainable.register("affine_coupling", _fake, _backward_fake, _setup_context, _make_backward, affine_coupling_triton,
                    affine_coupling_backward_triton)


def operator(impl: str):
    return _trainable.operator("affine_coupling", impl)
