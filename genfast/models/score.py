"""A small noise-conditional score network (NCSN-style) trained by denoising score matching over a
geometric ladder of noise levels, sampled with genfast's fused annealed Langevin dynamics."""

import math

import torch
from torch import nn

from .. import samplers


class NoiseConditionalScore(nn.Module):
    """s(x, sigma) = net(x, log sigma) / sigma, for flat data of `features` dimensions."""

    def __init__(self, features: int, sigmas, hidden: int = 128):
        super().__init__()
        self.sigmas = [float(s) for s in sigmas]
        self.net = nn.Sequential(
            nn.Linear(features + 1, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, features),
        )

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        flat = x.flatten(1)
        sigma = torch.as_tensor(sigma, dtype=flat.dtype, device=flat.device).expand(flat.shape[0]).reshape(-1, 1)
        return (self.net(torch.cat([flat, sigma.log()], dim=1)) / sigma).view_as(x)

    def loss(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Denoising score matching, weighted by sigma^2 (Song & Ermon 2019)."""
        levels = torch.tensor(self.sigmas, device=x.device)
        sigma = levels[torch.randint(0, len(self.sigmas), (x.shape[0],), device=x.device, generator=generator)]
        sigma = sigma.view(-1, *([1] * (x.dim() - 1)))
        noise = torch.randn(x.shape, device=x.device, generator=generator)
        target = -noise / sigma
        return 0.5 * ((self(x + sigma * noise, sigma.flatten()) - target) ** 2 * sigma**2).flatten(1).sum(1).mean()

    def fit(self, data: torch.Tensor, steps: int = 1000, batch_size: int = 256, lr: float = 3e-3, seed: int = 0):
        generator = torch.Generator(device=data.device).manual_seed(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            batch = data[torch.randint(0, data.shape[0], (batch_size,), device=data.device, generator=generator)]
            loss = self.loss(batch, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    @torch.no_grad()
    def sample(self, x_start: torch.Tensor, *, steps_per_level: int = 20, step_lr: float = 1e-3, generator=None,
               impl: str = "auto"):
        return samplers.annealed_langevin(self, x_start, self.sigmas, steps_per_level=steps_per_level,
                                          step_lr=step_lr, generator=generator, impl=impl)


def default_sigmas(data: torch.Tensor, num_levels: int = 10, sigma_min: float = 0.01) -> list:
    """sigma_max about the largest distance between data points (Song & Ermon 2020, technique 1)."""
    sigma_max = float(torch.cdist(data.flatten(1)[:512], data.flatten(1)[:512]).max())
    return samplers.geometric_sigmas(max(sigma_max, 10 * sigma_min), sigma_min, num_levels)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The energy distance between two samples (0 for equal distributions)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def two_moons(n: int, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """scikit-learn's two moons, standardized; generated, so nothing is downloaded."""
    from sklearn.datasets import make_moons

    points, _ = make_moons(n_samples=n, noise=noise, random_state=seed)
    points = torch.as_tensor(points, dtype=torch.float32)
    return (points - points.mean(0)) / points.std(0)


__all__ = ["NoiseConditionalScore", "default_sigmas", "energy_distance", "two_moons"]
