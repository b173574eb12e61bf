"""Binary autoregressive models of binarized images, log-likelihoods in nats:

- NADE (Larochelle & Murray 2011): genfast's fused NADE ops (genfast.nade_conditionals, nade_sample),
  the D conditionals in one kernel launch, sampling in one launch;
- MADE (Germain et al. 2015): an MLP whose weights are masked so that logit d sees only the
  dimensions before d in the ordering; each layer a genfast.nn.MaskedLinear.

impl picks the backend of the fused ops ("auto", "native", "triton", "reference"), as in flows.py.
"""

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .. import _checks
from ..nade import bernoulli_log_prob, nade_conditionals, nade_sample
from ..nn import ImplSwitch, MaskedLinear
from ..random import uniforms as random_uniforms
from ..reference.nade import made_degrees
from .flows import _fit

Tensor = torch.Tensor


def random_orderings(batch: int, dims: int, generator=None, device=None) -> Tensor:
    """(batch, dims) int64, one uniformly random permutation of 0..dims-1 per row."""
    return torch.rand(batch, dims, generator=generator, device=device).argsort(1)


class NADE(ImplSwitch, nn.Module):
    """Binary NADE: p(x) = prod_d p(x_{o_d} | x_{o_<d}), p(x_d = 1 | ...) = sigmoid(b_d + V_d . h_d),
    h_d = act(c + W[:, o_<d] x[o_<d]); W (H, D), c (H), V (D, H), b (D).

    W ~ N(0, 1/D) (a pre-activation sums up to D columns), V ~ N(0, 1/H), c = b = 0.
    An ordering (D,) for every sample or (B, D) one per sample may be given to log_prob; fit(...,
    order_agnostic=True) trains on a fresh random ordering per sample and step (Uria et al. 2014)."""

    def __init__(self, dims: int, hidden: int, *, activation: str = "sigmoid", impl: str = "auto",
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if dims < 1 or hidden < 1:
            raise ValueError(f"dims and hidden must be >= 1, got {dims} and {hidden}")
        _checks.check_choice("activation", activation, ("sigmoid", "relu"))
        self.dims, self.hidden, self.activation = dims, hidden, activation
        self.W = nn.Parameter(torch.randn(hidden, dims, generator=generator) / math.sqrt(dims))
        self.c = nn.Parameter(torch.zeros(hidden))
        self.V = nn.Parameter(torch.randn(dims, hidden, generator=generator) / math.sqrt(hidden))
        self.b = nn.Parameter(torch.zeros(dims))
        self.impl = impl

    def forward(self, x: Tensor, ordering: Optional[Tensor] = None) -> Tensor:
        """The logits (B, D) of p(x_d = 1 | the dimensions before d in the ordering)."""
        return nade_conditionals(x, self.W, self.c, self.V, self.b, ordering, activation=self.activation,
                                 impl=self.impl)

    def log_prob(self, x: Tensor, ordering: Optional[Tensor] = None) -> Tensor:
        """log p(x) (B,) in nats, float32."""
        return bernoulli_log_prob(x, self(x, ordering))

    def loss(self, x: Tensor, ordering: Optional[Tensor] = None) -> Tensor:
        """The mean negative log-likelihood (nats) of the batch."""
        return -self.log_prob(x, ordering).mean()

    def fit(self, data: Tensor, steps: int = 300, batch_size: int = 100, lr: float = 1e-2, seed: int = 0,
            order_agnostic: bool = False):
        """Adam on the negative log-likelihood; returns each batch's mean NLL (nats). order_agnostic:
        each sample of each batch in a fresh random ordering, drawn from the batch generator."""
        def loss_fn(batch, generator):
            order = random_orderings(*batch.shape, generator, batch.device) if order_agnostic else None
            return self.loss(batch, order)
        return _fit(self, loss_fn, data, steps, batch_size, lr, seed)

    @torch.no_grad()
    def sample(self, num_samples: int, generator=None, observed: Optional[Tensor] = None, num_observed: int = 0,
               ordering: Optional[Tensor] = None, uniforms: Optional[Tensor] = None) -> Tensor:
        """(num_samples, D) samples in one fused launch (genfast.nade_sample): a genfast.PhiloxGenerator
        gives the same samples on every backend. Conditional completion: the first num_observed
        dimensions of the ordering are copied from observed (num_samples, D), the rest sampled."""
        return nade_sample(self.W, self.c, self.V, self.b, num_samples, generator=generator, uniforms=uniforms,
                           ordering=ordering, observed=observed, num_observed=num_observed,
                           activation=self.activation, impl=self.impl)


class MADE(ImplSwitch, nn.Module):
    """MADE for binary data: masked linear layers with ReLUs between them, D output logits; hidden
    layers' masks M[k, j] = deg(k) >= deg(j), the output layer's strict, deg_in(d) > deg(k), so that
    logit d depends only on the inputs before d in the ordering (degrees from
    genfast.reference.nade.made_degrees: inputs 1 + their position, hidden units cyclic in [1, D-1]).

    log p(x) takes one forward pass; sampling takes D sequential passes, one per dimension (MADE's
    inherent cost, against NADE's one fused launch)."""

    def __init__(self, dims: int, hidden_sizes: Sequence[int], *, ordering: Optional[Tensor] = None,
                 impl: str = "auto"):
        super().__init__()
        if dims < 1 or not len(hidden_sizes):
            raise ValueError(f"dims must be >= 1 and hidden_sizes non-empty, got {dims} and {hidden_sizes}")
        hidden_sizes = [int(h) for h in hidden_sizes]
        order = torch.arange(dims) if ordering is None else torch.as_tensor(ordering, dtype=torch.int64)
        if not torch.equal(order.sort().values, torch.arange(dims)):
            raise ValueError(f"ordering must be a permutation of 0..{dims - 1}")
        degrees = made_degrees(dims, hidden_sizes, order)
        self.dims = dims
        self.register_buffer("ordering", order.clone())
        # sample()'s walk, read without a device synchronisation; a loaded state dict brings its own
        self._ordering_list = order.tolist()
        self.register_load_state_dict_post_hook(lambda module, keys: module._read_ordering())
        layers = [MaskedLinear(d_in.numel(), d_out.numel(), d_in, d_out, strict=False, impl=impl)
                  for d_in, d_out in zip(degrees[:-1], degrees[1:])]
        layers.append(MaskedLinear(hidden_sizes[-1], dims, degrees[-1], degrees[0], strict=True, impl=impl))
        self.layers = nn.ModuleList(layers)
        self.impl = impl

    def _read_ordering(self) -> None:
        self._ordering_list = self.ordering.tolist()

    def forward(self, x: Tensor) -> Tensor:
        """The logits (B, D) of p(x_d = 1 | the dimensions before d in the ordering)."""
        h = x
        for layer in self.layers[:-1]:
            h = torch.relu(layer(h))
        return self.layers[-1](h)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) (B,) in nats, float32."""
        return bernoulli_log_prob(x, self(x))

    def loss(self, x: Tensor) -> Tensor:
        return -self.log_prob(x).mean()

    def fit(self, data: Tensor, steps: int = 300, batch_size: int = 100, lr: float = 1e-2, seed: int = 0):
        """Adam on the negative log-likelihood; returns each batch's mean NLL (nats)."""
        return _fit(self, lambda batch, _: self.loss(batch), data, steps, batch_size, lr, seed)

    @torch.no_grad()
    def sample(self, num_samples: int, generator=None, observed: Optional[Tensor] = None, num_observed: int = 0,
               uniforms: Optional[Tensor] = None) -> Tensor:
        """(num_samples, D) samples by D forward passes: pass k sets x[o_k] = 1 where u < sigmoid(logit[o_k]).
        u is `uniforms` (num_samples, D) when given; for a genfast.PhiloxGenerator, the Philox stream
        NADE's sampler reads (element (r, d) is philox_uniform's r * D + d), else torch.rand with the
        torch.Generator. The first num_observed dimensions of the ordering are copied from observed."""
        param = self.layers[-1].weight
        if uniforms is None:
            uniforms = random_uniforms((num_samples, self.dims), generator, param.device)
        if uniforms.shape != (num_samples, self.dims):
            raise ValueError(f"uniforms must have shape {(num_samples, self.dims)}, got {tuple(uniforms.shape)}")
        if num_observed and (observed is None or observed.shape != (num_samples, self.dims)):
            raise ValueError(f"observed (num_samples, D) = {(num_samples, self.dims)} must be given when "
                             "num_observed > 0")
        x = torch.zeros(num_samples, self.dims, dtype=param.dtype, device=param.device)
        for k, d in enumerate(self._ordering_list):
            if k < num_observed:
                x[:, d] = observed[:, d].to(x.dtype)
            else:
                p = torch.sigmoid(self(x)[:, d])
                x[:, d] = torch.where(p.isnan(), p, (uniforms[:, d] < p).to(p.dtype)).to(x.dtype)  # NaN propagates
        return x
