"""A small DDPM: an MLP denoiser over flattened images and an ancestral sampler whose step runs
either genfast.reference (impl="reference") or the fused kernel (impl="auto", "native", "triton")."""

import math

import torch
from torch import nn

from .. import diffusion
from ..reference import diffusion as reference


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TinyDenoiser(nn.Module):
    """Predicts the noise of a flattened image from the noisy image and the timestep."""

    def __init__(self, features: int, hidden: int = 256, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(features + time_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, features),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        out = self.net(torch.cat([flat, timestep_embedding(t, self.time_dim)], dim=1))
        return out.view_as(x)


class DDPM(nn.Module):
    """Denoiser plus a linear beta schedule (Ho et al. 2020), epsilon prediction."""

    def __init__(self, sample_shape, timesteps: int = 100, beta_start: float = 1e-4, beta_end: float = 0.05,
                 hidden: int = 256):
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        self.timesteps = timesteps
        self.denoiser = TinyDenoiser(math.prod(sample_shape), hidden)
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def loss(self, x0: torch.Tensor, generator=None) -> torch.Tensor:
        t = torch.randint(0, self.timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        a = self.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return (self.denoiser(noisy, t) - noise).pow(2).mean()

    def fit(self, data: torch.Tensor, steps: int = 400, batch_size: int = 128, lr: float = 2e-3, seed: int = 0):
        """Trains on `data` (N, *sample_shape); returns the loss of each step."""
        generator = torch.Generator(device=data.device).manual_seed(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            index = torch.randint(0, data.shape[0], (batch_size,), device=data.device, generator=generator)
            loss = self.loss(data[index], generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    def noise_for_sampling(self, n: int, generator=None, device=None):
        """The initial sample and one noise tensor per step: with them both samplers are comparable."""
        shape = (n, *self.sample_shape)
        draws = torch.randn((self.timesteps + 1, *shape), generator=generator, device=device)
        return draws[0], list(draws[1:])

    @torch.no_grad()
    def sample(self, n: int = 16, *, impl: str = "auto", x_T=None, noises=None, generator=None,
               per_sample_timesteps: bool = False):
        """Ancestral sampling from t = T - 1 to 0. Without noises, impl != "reference" draws the
        step noise inside the kernel from `generator`. per_sample_timesteps passes the schedule as
        one value per sample (tensors), the form a batch at mixed timesteps needs."""
        device = self.alphas_cumprod.device
        x = torch.randn((n, *self.sample_shape), device=device, generator=generator) if x_T is None else x_T.clone()
        for step, t in enumerate(range(self.timesteps - 1, -1, -1)):
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[t - 1] if t > 0 else torch.ones((), device=device)
            if per_sample_timesteps:
                a_t, a_prev = a_t.expand(n), a_prev.expand(n)
            else:
                a_t, a_prev = float(a_t), float(a_prev)
            eps = self.denoiser(x, torch.full((n,), t, device=device))
            noise = noises[step] if noises is not None else None
            if impl == "reference":
                x, _ = reference.ddpm_step(eps, x, a_t, a_prev, noise)
            else:
                x = diffusion.ddpm_step(eps, x, a_t, a_prev, noise=noise, generator=generator, out=x, impl=impl)
        return x
