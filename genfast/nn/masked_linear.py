"""MADE's masked linear layer as a module."""

import math

import torch
from torch import nn

from .. import made
from ..reference.nade import degree_mask


class MaskedLinear(nn.Module):
    """nn.Linear whose connections follow MADE's degrees: output k sees input j when
    out_degrees[k] >= in_degrees[j] (> with strict=True, for the output layer). The mask is
    computed in the kernel from the degrees (buffers), never stored as a matrix."""

    def __init__(self, in_features: int, out_features: int, in_degrees, out_degrees, *, strict: bool = False,
                 bias: bool = True, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.strict, self.impl = in_features, out_features, strict, impl
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("in_degrees", torch.as_tensor(in_degrees, dtype=torch.int64, device=device).clone())
        self.register_buffer("out_degrees", torch.as_tensor(out_degrees, dtype=torch.int64, device=device).clone())
        if self.in_degrees.shape != (in_features,) or self.out_degrees.shape != (out_features,):
            raise ValueError(f"in_degrees and out_degrees must have shapes ({in_features},) and ({out_features},), "
                             f"got {tuple(self.in_degrees.shape)} and {tuple(self.out_degrees.shape)}")
        self.reset_parameters()

    def reset_parameters(self):
        """nn.Linear's initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def mask(self) -> torch.Tensor:
        """The (out, in) bool connectivity, for inspection."""
        return degree_mask(self.in_degrees, self.out_degrees, self.strict)

    def forward(self, x):
        return made.made_linear(x, self.weight, self.bias, self.in_degrees, self.out_degrees, strict=self.strict,
                                impl=self.impl)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"strict={self.strict}, impl={self.impl!r}")
