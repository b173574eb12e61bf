"""torch.ops.genfast.lu_weight and lu_weight_backward (native, from _C), their Triton forms
(custom_ops with explicit fakes), and the autograd that links each forward to its backward."""

from typing import Tuple

import torch

from . import _trainable

Tensor = torch.Tensor


def _fake(lower, upper, log_diag, sign, perm):
    return torch.empty_like(lower), log_diag.new_empty(())


def _backward_fake(grad_weight, grad_logabsdet, lower, upper, log_diag, sign, perm):
    return torch.empty_like(lower), torch.empty_like(upper), torch.empty_like(log_diag)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_backward(backward_op):
    def backward(ctx, grad_weight, grad_logabsdet):
        lower, upper, log_diag, sign, perm = ctx.saved_tensors
        if grad_weight is None:
            grad_weight = torch.zeros_like(lower)
        if grad_logabsdet is None:
            grad_logabsdet = log_diag.new_zeros(())
        grads = backward_op(grad_weight, grad_logabsdet, lower, upper, log_diag, sign, perm)
        return grads + (None, None)

    return backward


def diagonal(log_diag: Tensor, sign: Tensor) -> Tensor:
    """U's diagonal, sign * exp(log_diag), float32 contiguous."""
    return (sign.float() * torch.exp(log_diag.float())).contiguous()


def finish_log_diag_grad(grad_diag: Tensor, diag: Tensor, grad_logabsdet: Tensor) -> Tensor:
    """d log_diag = dU[k, k] * U[k, k] + d logabsdet."""
    return grad_diag * diag + grad_logabsdet.float()


@torch.library.custom_op("genfast::lu_weight_triton", mutates_args=())
def lu_weight_triton(lower: Tensor, upper: Tensor, log_diag: Tensor, sign: Tensor, perm: Tensor) -> Tuple[Tensor, Tensor]:
    from ..kernels.lu_weight import launch_lu_weight

    weight = torch.empty_like(lower)
    if lower.numel() > 0:
        launch_lu_weight(lower.contiguous(), upper.contiguous(), diagonal(log_diag, sign), perm.contiguous(), weight)
    return weight, log_diag.sum()


@torch.library.custom_op("genfast::lu_weight_backward_triton", mutates_args=())
def lu_weight_backward_triton(grad_weight: Tensor, grad_logabsdet: Tensor, lower: Tensor, upper: Tensor,
                              log_diag: Tensor, sign: Tensor, perm: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    from ..kernels.lu_weight import launch_lu_weight_backward

    grad_lower, grad_upper = torch.empty_like(lower), torch.empty_like(upper)
    grad_diag = torch.empty_like(log_diag)
    diag = diagonal(log_diag, sign)
    if lower.numel() > 0:
        launch_lu_weight_backward(grad_weight.contiguous(), lower.contiguous(), upper.contiguous(), diag,
                                  perm.contiguous(), grad_lower, grad_upper, grad_diag)
    return grad_lower, grad_upper, finish_log_diag_grad(grad_diag, diag, grad_logabsdet)


_trainable.register("lu_weight", _fake, _backward_fake, _setup_context, _make_backward, lu_weight_triton,
                    lu_weight_backward_triton)


def operator(impl: str):
    return _trainable.operator("lu_weight", impl)
