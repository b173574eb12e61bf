"""Small normalizing flows with exact likelihoods: RealNVP for 2-D data and a Glow-style flow for
8x8 digits, built from genfast.nn's layers so that the same model runs the fused ops or the
reference (impl="reference")."""

import math

import torch
from torch import nn

from ..nn import ActNorm, AffineCoupling, ImplSwitch, InvertibleConv1x1

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.flatten(1) ** 2 + LOG_2PI).sum(1)


class Flow(ImplSwitch, nn.Module):
    """A stack of invertible layers over a standard normal base; log-likelihoods in nats."""

    def __init__(self, layers, latent_shape, impl: str):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.latent_shape = tuple(latent_shape)
        self.impl = impl

    def forward(self, x):
        """(z, log|det dz/dx|)."""
        logdet = x.new_zeros(x.shape[0], dtype=torch.float32)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z):
        logdet = z.new_zeros(z.shape[0], dtype=torch.float32)
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z)
            logdet = logdet + ld
        return z, logdet

    def log_prob(self, x):
        """log p(x) per sample."""
        z, logdet = self(x)
        return standard_normal_log_prob(z) + logdet

    @torch.no_grad()
    def sample(self, n: int, *, generator=None, temperature: float = 1.0):
        device = next(self.parameters()).device
        z = temperature * torch.randn((n, *self.latent_shape), generator=generator, device=device)
        return self.inverse(z)[0]


def _fit(model, loss_fn, data, steps, batch_size, lr, seed):
    """Adam on loss_fn(batch, generator); returns the loss of each step."""
    generator = torch.Generator(device=data.device).manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        batch = data[torch.randint(0, data.shape[0], (batch_size,), device=data.device, generator=generator)]
        loss = loss_fn(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def mlp_conditioner(features: int, hidden: int) -> nn.Module:
    """features -> 2 * features, starting at zero (each coupling starts as a fixed scaling)."""
    net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, 2 * features))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class RealNVP(Flow):
    """Affine couplings over alternating halves of the features (masked layout), with MLP
    conditioners and RealNVP's tanh soft clamp of log s."""

    def __init__(self, features: int = 2, num_layers: int = 8, hidden: int = 64, *, scale_fn: str = "tanh",
                 clamp: float = 2.0, impl: str = "auto"):
        if features < 2:
            raise ValueError(f"features must be at least 2, got {features}")
        layers = [AffineCoupling(torch.arange(features) % 2 == i % 2, mlp_conditioner(features, hidden),
                                 layout="masked", scale_fn=scale_fn, clamp=clamp) for i in range(num_layers)]
        super().__init__(layers, (features,), impl)

    def fit(self, data, steps: int = 500, batch_size: int = 256, lr: float = 3e-3, seed: int = 0):
        """Maximum likelihood; returns the mean negative log-likelihood (nats) of each batch."""
        return _fit(self, lambda batch, _: -self.log_prob(batch).mean(), data, steps, batch_size, lr, seed)


class Squeeze(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2), each 2x2 patch into channels; volume preserving."""

    def forward(self, x):
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b, dtype=torch.float32)

    def inverse(self, y):
        b, c, h, w = y.shape
        x = y.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)
        return x, y.new_zeros(b, dtype=torch.float32)


def conv_conditioner(in_channels: int, out_channels: int, hidden: int) -> nn.Module:
    """Glow's coupling network (without its ActNorms), last convolution zero-initialised."""
    net = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1),
                        nn.ReLU(), nn.Conv2d(hidden, out_channels, 3, padding=1))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def glow_step(channels: int, hidden: int, generator=None):
    """ActNorm, invertible 1x1 convolution, affine coupling of the second channel half given the first."""
    half = channels // 2
    mask = torch.arange(channels) >= half
    coupling = AffineCoupling(mask, conv_conditioner(half, 2 * (channels - half), hidden), layout="split",
                              scale_fn="sigmoid", eps=0.0, order="glow")
    return [ActNorm(channels, order="glow"), InvertibleConv1x1(channels, generator=generator), coupling]


class Glow(Flow):
    """A small Glow on dequantized images: per level a squeeze, then `steps_per_level` steps of
    [ActNorm, InvertibleConv1x1, AffineCoupling]; no factoring out, a standard normal base over all
    dimensions.

    The data are discrete: intensities on a grid of spacing `bin_width` (scikit-learn's digits,
    0..16 scaled to [-1, 1]: bin_width 1/8). The flow's density p is over the dequantized
    y = x + (u - 1/2) * bin_width, u ~ U[0, 1)^D, and
        log P(x) >= E_u[log p(y)] + D log(bin_width)
    (Theis et al. 2016) is the bound on the log-probability of the discrete image that
    `discrete_log_prob` estimates and `bits_per_dim` reports. sample() gives dequantized images;
    quantize() rounds them to the grid."""

    def __init__(self, sample_shape=(1, 8, 8), *, levels: int = 2, steps_per_level: int = 4, hidden: int = 64,
                 bin_width: float = 1 / 8, generator=None, impl: str = "auto"):
        c, h, w = sample_shape
        if h % 2**levels or w % 2**levels:
            raise ValueError(f"height and width must be divisible by 2**levels = {2**levels}, got {h}x{w}")
        layers = []
        for _ in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            layers.append(Squeeze())
            for _ in range(steps_per_level):
                layers.extend(glow_step(c, hidden, generator))
        super().__init__(layers, (c, h, w), impl)
        self.data_shape = tuple(sample_shape)
        self.bin_width = bin_width

    def dequantize(self, x, generator=None):
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + (noise - 0.5) * self.bin_width

    def discrete_log_prob(self, x, generator=None):
        """One-sample estimate of the lower bound on log P(x) (nats) of each discrete image x."""
        dims = math.prod(x.shape[1:])
        return self.log_prob(self.dequantize(x, generator)) + dims * math.log(self.bin_width)

    def bits_per_dim(self, x, generator=None):
        """-discrete_log_prob / (D log 2), averaged over the batch."""
        dims = math.prod(x.shape[1:])
        return -self.discrete_log_prob(x, generator).mean() / (dims * math.log(2))

    def quantize(self, y, low: float = -1.0, high: float = 1.0):
        """The grid point of each dequantized value."""
        return (torch.round((y - low) / self.bin_width) * self.bin_width + low).clamp(low, high)

    def fit(self, data, steps: int = 300, batch_size: int = 128, lr: float = 1e-3, seed: int = 0):
        """Maximum likelihood of the dequantized data; returns each batch's bits/dim."""
        return _fit(self, self.bits_per_dim, data, steps, batch_size, lr, seed)
