"""Glow's invertible 1x1 convolution with the LU-parameterized weight W = P L U."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import flows
from ..reference.flows import logdet_dtype


class InvertibleConv1x1(nn.Module):
    """y = W x at every position of x (B, C, *spatial) or x (B, C). W starts as a random rotation;
    P stays fixed, the strictly triangular L and U, and log|diag U|, are learned (diag U keeps
    its sign). logdet = spatial size * log|det W|."""

    def __init__(self, num_channels: int, *, generator=None, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        rotation, _ = torch.linalg.qr(torch.randn(num_channels, num_channels, generator=generator,
                                                  dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(rotation)
        diag = upper.diagonal()
        self.lower = nn.Parameter(lower.tril(-1).float())
        self.upper = nn.Parameter(upper.triu(1).float())
        self.log_diag = nn.Parameter(diag.abs().log().float())
        self.register_buffer("sign", diag.sign().float())
        self.register_buffer("perm", p.argmax(1))  # row i of W is row perm[i] of L U

    def weight(self):
        """(W, log|det W|)."""
        return flows.lu_weight(self.lower, self.upper, self.log_diag, self.sign, self.perm, impl=self.impl)

    def forward(self, x):
        w, logabsdet = self.weight()
        return _apply(w, x), self._logdet(logabsdet, x)

    def inverse(self, y):
        w, logabsdet = self.weight()
        # on a GPU inv_ex: inv would read its info on the host (a synchronisation) to refuse a singular w
        inverse = torch.linalg.inv(w) if w.device.type == "cpu" else torch.linalg.inv_ex(w).inverse
        return _apply(inverse, y), -self._logdet(logabsdet, y)

    @staticmethod
    def _logdet(logabsdet, x):
        spatial = math.prod(x.shape[2:])
        return (spatial * logabsdet).to(logdet_dtype(x.dtype)).expand(x.shape[0])

    def extra_repr(self):
        return f"{self.log_diag.numel()}, impl={self.impl!r}"


def _apply(w, x):
    w = w.to(x.dtype)
    if x.dim() == 2:
        return F.linear(x, w)
    if x.dim() == 3:
        return F.conv1d(x, w[:, :, None])
    if x.dim() == 4:
        return F.conv2d(x, w[:, :, None, None])
    raise ValueError(f"x must have shape (B, C), (B, C, L) or (B, C, H, W), got {tuple(x.shape)}")
