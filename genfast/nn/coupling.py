"""The affine coupling layer (RealNVP, Glow) on genfast.flows.affine_coupling."""

from typing import Optional

import torch
from torch import nn

from .. import flows

LAYOUTS = ("masked", "split")


class AffineCoupling(nn.Module):
    """y = x * s + t (order="affine") or (x + t) * s (order="glow") on the elements `mask`
    marks, y = x elsewhere; t and the unconstrained scale come from `conditioner` applied to the
    elements left unchanged, s from `scale_fn` (see genfast.flows.affine_coupling).

    mask: bool over the sample shape, or over channels (x.shape[1]). layout:
    - "masked" (RealNVP's checkerboards): the conditioner sees x * ~mask, of x's shape, and
      returns 2C channels: shift and scale of x's shape (values at unchanged elements unused).
    - "split" (Glow, nflows): the conditioner sees only the unchanged elements, x[:, ~mask] for a
      channel mask (else x.flatten(1)[:, ~mask]), and returns shift and scale of the transformed
      elements, concatenated along dim 1.
    """

    def __init__(self, mask, conditioner: nn.Module, *, layout: str = "masked", scale_fn: str = "exp",
                 eps: Optional[float] = None, clamp: float = 2.0, slope: float = 1e-3, order: str = "affine",
                 impl: str = "auto"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if order not in flows.ORDERS:
            raise ValueError(f"order must be one of {flows.ORDERS}, got {order!r}")
        flows.scale_param(scale_fn, eps, clamp, slope)  # validates the options
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() == 0 or not mask.any() or mask.all():
            raise ValueError("mask must mark some elements to transform and some to keep")
        self.conditioner = conditioner
        self.layout, self.order, self.impl = layout, order, impl
        self.scale_options = dict(scale_fn=scale_fn, eps=eps, clamp=clamp, slope=slope)
        self.register_buffer("mask", mask)
        self.register_buffer("keep", (~mask).to(torch.float32), persistent=False)
        self.register_buffer("identity_positions", torch.nonzero(~mask.reshape(-1)).flatten(), persistent=False)
        positions = self.identity_positions.tolist()
        # a channel range is a view of x; other selections copy
        self._identity_range = (positions[0], positions[-1] + 1) \
            if mask.dim() == 1 and positions == list(range(positions[0], positions[-1] + 1)) else None
        self.register_buffer("index", None, persistent=False)  # coupling_index, per sample shape
        self._index_shape = None

    def forward(self, x):
        shift, scale = self._shift_and_scale(x)
        return flows.affine_coupling(x, shift, scale, self._index(x), order=self.order, impl=self.impl,
                                     **self.scale_options)

    def inverse(self, y):
        shift, scale = self._shift_and_scale(y)  # the unchanged elements are the same in x and y
        return flows.affine_coupling(y, shift, scale, self._index(y), order=self.order, inverse=True, impl=self.impl,
                                     **self.scale_options)

    def identity_part(self, x):
        """What the conditioner sees."""
        if self.layout == "masked":
            keep = self.keep if self.mask.dim() == x.dim() - 1 else self.keep.reshape((-1,) + (1,) * (x.dim() - 2))
            return x * keep.to(x.dtype)
        if self._identity_range is not None:
            start, stop = self._identity_range
            return x[:, start:stop]
        if self.mask.dim() == 1:
            return x.index_select(1, self.identity_positions)
        return x.flatten(1).index_select(1, self.identity_positions)

    def _shift_and_scale(self, x):
        out = self.conditioner(self.identity_part(x))
        n = out.shape[1] // 2
        return out[:, :n], out[:, n:]

    def _index(self, x):
        shape = tuple(x.shape[1:])
        if self._index_shape != shape or self.index.device != x.device:
            self.index = flows.coupling_index(self.mask.to(x.device), shape, compact=self.layout == "split")
            self._index_shape = shape
        return self.index

    def extra_repr(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.scale_options.items())
        return f"layout={self.layout!r}, order={self.order!r}, {options}, impl={self.impl!r}"
