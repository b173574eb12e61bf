"""Invertible layers of normalizing flows on genfast's fused ops. Each maps x to (y, logdet) in
forward() and back in inverse() (logdet negated); `impl` picks the backend of the fused ops."""

from torch import nn

from .actnorm import ActNorm
from .coupling import AffineCoupling
from .invertible_conv import InvertibleConv1x1


def set_impl(module: nn.Module, impl: str) -> nn.Module:
    """Sets `impl` on every submodule that has one (including module itself)."""
    for m in module.modules():
        if hasattr(m, "impl"):
            m.impl = impl
    return module


__all__ = ["ActNorm", "AffineCoupling", "InvertibleConv1x1", "set_impl"]
