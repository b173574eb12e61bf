"""Layers on genfast's fused ops; `impl` picks their backend. The invertible layers of normalizing
flows map x to (y, logdet) in forward() and back in inverse() (logdet negated); MaskedLinear is
MADE's autoregressive layer."""

from torch import nn

from .actnorm import ActNorm
from .coupling import AffineCoupling
from .invertible_conv import InvertibleConv1x1
from .masked_linear import MaskedLinear


def set_impl(module: nn.Module, impl: str) -> nn.Module:
    """Sets `impl` on every submodule that has one (including module itself)."""
    for m in module.modules():
        if hasattr(m, "impl"):
            m.impl = impl
    return module


__all__ = ["ActNorm", "AffineCoupling", "InvertibleConv1x1", "MaskedLinear", "set_impl"]
