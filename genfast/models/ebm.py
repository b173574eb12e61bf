"""A small energy-based model trained by persistent contrastive divergence: negatives come from
genfast's fused SGLD chains started from a replay buffer (IGEBM / JEM style)."""

import torch
from torch import nn

from .. import samplers


class EnergyMLP(nn.Module):
    """E(x) for flat data; lower energy means more likely."""

    def __init__(self, features: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).squeeze(1)


class EBM(nn.Module):
    def __init__(self, features: int, *, box: float = 3.0, hidden: int = 128, buffer_size: int = 4096,
                 reinit_prob: float = 0.05, sgld_steps: int = 40, step_size: float = 0.05, noise_std: float = 0.05,
                 seed: int = 0):
        super().__init__()
        self.energy = EnergyMLP(features, hidden)
        self.box = box
        self.sgld_steps, self.step_size, self.noise_std = sgld_steps, step_size, noise_std
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer = samplers.ReplayBuffer(buffer_size, self.uniform_noise(features), reinit_prob, self.generator)

    def uniform_noise(self, features):
        return lambda n: (torch.rand(n, features, generator=self.generator) * 2 - 1) * self.box

    def _device(self) -> torch.device:
        return next(self.energy.parameters()).device

    def negatives(self, n: int, impl: str = "auto"):
        if self.buffer.samples.device != self._device():  # the model moved (EBM.to): its chains follow
            self.buffer.samples = self.buffer.samples.to(self._device())
        start, index = self.buffer.sample(n)
        x = samplers.sgld(self.energy, start, self.sgld_steps, self.step_size, noise_std=self.noise_std,
                          clamp=(-self.box, self.box), generator=self.generator, impl=impl)
        self.buffer.push(x, index)
        return x

    def fit(self, data: torch.Tensor, steps: int = 300, batch_size: int = 256, lr: float = 1e-3, alpha: float = 0.1,
            impl: str = "auto"):
        """Contrastive divergence with an energy-magnitude penalty alpha * (E+^2 + E-^2) (IGEBM)."""
        optimizer = torch.optim.Adam(self.energy.parameters(), lr=lr, betas=(0.0, 0.999))
        losses = []
        for _ in range(steps):
            positives = data[torch.randint(0, data.shape[0], (batch_size,), generator=self.generator)]
            negatives = self.negatives(batch_size, impl)
            e_pos, e_neg = self.energy(positives), self.energy(negatives)
            loss = e_pos.mean() - e_neg.mean() + alpha * (e_pos**2 + e_neg**2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    def sample(self, n: int, num_steps: int = 200, *, generator=None, impl: str = "auto"):
        start = self.uniform_noise(self.energy.net[0].in_features)(n).to(self._device())
        return samplers.sgld(self.energy, start, num_steps, self.step_size, noise_std=self.noise_std,
                             clamp=(-self.box, self.box), generator=generator, impl=impl)
