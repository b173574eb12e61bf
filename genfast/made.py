"""MADE's masked linear layer fused (Germain et al. 2015): y = x (W * M)^T + bias, the mask M
computed in the kernel from the units' degrees, never materialized, forward and backward.

M[k, j] = out_degrees[k] >= in_degrees[j] for hidden layers, or > with strict=True for the output
layer (genfast.reference.nade.degree_mask; made_degrees builds the degrees for an ordering).
Masked-out weights take no part, whatever their value.
"""

import math
from typing import Optional

import torch

from . import _backend, _checks
from .ops import made_linear as made_linear_op
from .reference import nade as reference

Tensor = torch.Tensor


def _check_degrees(name, degrees, size, x):
    if not isinstance(degrees, Tensor) or degrees.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got "
                        f"{getattr(degrees, 'dtype', type(degrees).__name__)}")
    if degrees.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(degrees.shape)}")
    if degrees.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {degrees.device}")


def made_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_degrees: Tensor, out_degrees: Tensor, *,
                strict: bool = False, impl: str = "auto") -> Tensor:
    """x (..., in) -> (..., out) through weight (out, in) masked by the degrees' connectivity.
    weight and bias have x's dtype (float32/float16/bfloat16; float64 with impl="reference")."""
    if not (impl == "reference" and isinstance(x, Tensor) and x.dtype == torch.float64):
        _checks.check_float_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in_features), got a 0-d tensor")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (out_features, in_features = {x.shape[-1]}), got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must have the dtype and device of x ({x.dtype}, {x.device}), got "
                             f"{t.dtype}, {t.device}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_degrees("in_degrees", in_degrees, weight.shape[1], x)
    _check_degrees("out_degrees", out_degrees, weight.shape[0], x)
    _checks.check_choice("impl", impl, _backend.IMPLS)
    backend = _backend.resolve_impl(impl, x.device)
    if backend == "reference":
        return reference.made_linear(x, weight, bias, in_degrees, out_degrees, strict)
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    y = made_linear_op.operator(backend)(rows, weight, bias, in_degrees, out_degrees, bool(strict))
    return y.reshape(*x.shape[:-1], weight.shape[0])
