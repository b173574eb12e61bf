"""Glow's ActNorm: a per-channel affine map initialised from the first batch it sees."""

import torch
from torch import nn

from .. import flows


class ActNorm(nn.Module):
    """y = x * exp(log_scale) + bias (order="affine") or (x + bias) * exp(log_scale) (order="glow")
    per channel of x (B, C, *spatial). The first forward in training mode sets the parameters so
    that this batch's output has zero mean and unit variance per channel."""

    def __init__(self, num_channels: int, *, order: str = "affine", impl: str = "auto"):
        super().__init__()
        if order not in flows.ORDERS:
            raise ValueError(f"order must be one of {flows.ORDERS}, got {order!r}")
        self.order, self.impl = order, impl
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False  # mirrors the buffer, so that forward never reads a GPU tensor

    def forward(self, x):
        if self.training and not self._initialized:
            self.initialize(x)
        return flows.actnorm(x, self.log_scale, self.bias, order=self.order, impl=self.impl)

    def inverse(self, y):
        return flows.actnorm(y, self.log_scale, self.bias, order=self.order, inverse=True, impl=self.impl)

    @torch.no_grad()
    def initialize(self, x, eps: float = 1e-6):
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        log_scale = -torch.log(x.std(dims, unbiased=False) + eps)
        bias = -mean if self.order == "glow" else -mean * torch.exp(log_scale)
        self.log_scale.copy_(log_scale)
        self.bias.copy_(bias)
        self.initialized.fill_(True)
        self._initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def extra_repr(self):
        return f"{self.log_scale.numel()}, order={self.order!r}, impl={self.impl!r}"
