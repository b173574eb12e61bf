"""torch.ops.genfast.made_linear and made_linear_backward (native, from _C), their Triton forms
(custom_ops with explicit fakes, on every device), and the autograd that links them."""

from typing import Optional, Tuple

import torch

from . import _trainable

Tensor = torch.Tensor


def _fake(x, weight, bias, in_degrees, out_degrees, strict):
    return x.new_empty(x.shape[0], weight.shape[0])


def _backward_fake(grad_y, x, weight, in_degrees, out_degrees, strict):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty(weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_degrees, out_degrees, strict = inputs
    ctx.save_for_backward(x, weight, in_degrees, out_degrees)
    ctx.strict, ctx.has_bias = strict, bias is not None


def _make_backward(backward_op):
    def backward(ctx, grad_y):
        x, weight, in_degrees, out_degrees = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = backward_op(grad_y, x, weight, in_degrees, out_degrees, ctx.strict)
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None, None

    return backward


@torch.library.custom_op("genfast::made_linear_triton", mutates_args=())
def made_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_degrees: Tensor, out_degrees: Tensor,
                       strict: bool) -> Tensor:
    from ..kernels.made_linear import launch_made_linear

    y = x.new_empty(x.shape[0], weight.shape[0])
    launch_made_linear(x.contiguous(), weight.contiguous(), bias, in_degrees.int().contiguous(),
                       out_degrees.int().contiguous(), strict, y)
    return y


@torch.library.custom_op("genfast::made_linear_backward_triton", mutates_args=())
def made_linear_backward_triton(grad_y: Tensor, x: Tensor, weight: Tensor, in_degrees: Tensor, out_degrees: Tensor,
                                strict: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from ..kernels.made_linear import launch_made_linear_backward

    grad_y = grad_y.to(x.dtype).contiguous()
    grad_x, grad_weight = torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)
    launch_made_linear_backward(grad_y, x.contiguous(), weight.contiguous(), in_degrees.int().contiguous(),
                                out_degrees.int().contiguous(), strict, grad_x, grad_weight)
    return grad_x, grad_weight, grad_y.float().sum(0).to(weight.dtype)


_trainable.register("made_linear", _fake, _backward_fake, _setup_context, _make_backward, made_linear_triton,
                    made_linear_backward_triton)


def operator(impl: str):
    return _trainable.operator("made_linear", impl)
