"""Layers on genfast's fused ops; `impl` picks their backend. The invertible layers of normalizing
flows map x to (y, logdet) in forward() and back in inverse() (logdet negated); MaskedLinear is
MADE's autoregressive layer."""

from torch import nn

from .. import _backend, _checks

from .actnorm import ActNorm
from .coupling import AffineCoupling
from .invertible_conv import InvertibleConv1x1
from .masked_linear import MaskedLinear


class ImplSwitch:
    """For models: an `impl` property that checks the value and, when set, passes it to every
    submodule that has one."""

    @property
    def impl(self):
        return self._impl

    @impl.setter
    def impl(self, value):
        _checks.check_choice("impl", value, _backend.IMPLS)
        self._impl = value
        for child in self.children():
            set_impl(child, value)


def set_impl(module: nn.Module, impl: str) -> nn.Module:
    """Sets `impl` on every submodule that has one (including module itself)."""
    for m in module.modules():
        if hasattr(m, "impl"):
            m.impl = impl
    return module


__all__ = ["ActNorm", "AffineCoupling", "ImplSwitch", "InvertibleConv1x1", "MaskedLinear", "set_impl"]
