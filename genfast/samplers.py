"""Samplers for energy-based and score-based models, built only from genfast's fused steps.

Each takes a score function s(x, level) (or an energy function, for SGLD) and runs its chain with
the fused Langevin, corrector and predictor steps; impl="reference" runs the same chain on the
reference ops, which with the same generator gives the same chain up to float rounding.
"""

import math
from typing import Callable, Sequence

import torch

from . import langevin as steps
from .random import uniforms


def _floats(levels) -> list:
    if isinstance(levels, torch.Tensor):
        if levels.device.type != "cpu":
            raise ValueError("noise levels must be floats or a CPU tensor (a device tensor would be read on the host)")
        return [float(v) for v in levels.reshape(-1)]
    return [float(v) for v in levels]


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> list:
    """NCSN's noise levels: a geometric sequence from sigma_max down to sigma_min."""
    return [float(v) for v in torch.logspace(math.log10(sigma_max), math.log10(sigma_min), num_levels,
                                             dtype=torch.float64)]


@torch.no_grad()
def annealed_langevin(score_fn: Callable, x: torch.Tensor, sigmas: Sequence[float], *, steps_per_level: int = 100,
                      step_lr: float = 2e-5, denoise: bool = True, generator=None, impl: str = "auto"):
    """Annealed Langevin dynamics (NCSN, Song & Ermon 2019): at each level sigma_i, steps_per_level
    Langevin steps of size step_lr * (sigma_i / sigma_min)^2; then, with denoise, one step of
    Tweedie's denoising x + sigma_min^2 * s(x, sigma_min). score_fn(x, sigma) returns the score."""
    levels = _floats(sigmas)
    x = x.clone()
    for sigma in levels:
        step = step_lr * (sigma / levels[-1]) ** 2
        for _ in range(steps_per_level):
            steps.langevin_step(x, score_fn(x, sigma), step, generator=generator, out=x, impl=impl)
    if denoise:
        steps.langevin_step(x, score_fn(x, levels[-1]), levels[-1] ** 2, noise_std=0.0, out=x, impl=impl)
    return x


@torch.no_grad()
def pc_sampler_ve(score_fn: Callable, x: torch.Tensor, sigmas: Sequence[float], *, snr: float = 0.16,
                  corrector_steps: int = 1, denoise: bool = True, generator=None, impl: str = "auto"):
    """score_sde's predictor-corrector sampler for the VE SDE: at each noise level, corrector steps
    (Langevin, step size from snr), then the reverse-diffusion predictor to the next level (the
    last predictor step goes to sigma = 0 and, with denoise, returns its noiseless mean)."""
    levels = _floats(sigmas) + [0.0]
    x = x.clone()
    for i, sigma in enumerate(levels[:-1]):
        for _ in range(corrector_steps):
            steps.langevin_corrector_step(score_fn(x, sigma), x, snr, generator=generator, out=x, impl=impl)
        last = i == len(levels) - 2
        result, mean = steps.ve_sde_step(score_fn(x, sigma), x, sigma, levels[i + 1], generator=generator,
                                         return_mean=True, impl=impl)
        x = mean if (last and denoise) else result
    return x


@torch.no_grad()
def pc_sampler_vp(score_fn: Callable, x: torch.Tensor, *, num_steps: int = 1000, beta_min: float = 0.1,
                  beta_max: float = 20.0, eps: float = 1e-3, snr: float = 0.16, corrector_steps: int = 1,
                  denoise: bool = True, generator=None, impl: str = "auto"):
    """score_sde's predictor-corrector sampler for the VP SDE (beta(t) linear from beta_min to
    beta_max): Euler-Maruyama predictor steps from t = 1 to eps, each after Langevin corrector
    steps with alpha the discrete schedule's alpha at t. score_fn(x, t) takes the time t."""
    times = torch.linspace(1.0, eps, num_steps, dtype=torch.float64)
    dt = 1.0 / num_steps  # as score_sde's EulerMaruyamaPredictor takes it
    x = x.clone()
    for i, t in enumerate(times.tolist()):
        beta = beta_min + t * (beta_max - beta_min)
        index = int(t * (num_steps - 1))
        alpha = 1.0 - (beta_min + index / (num_steps - 1) * (beta_max - beta_min)) / num_steps
        for _ in range(corrector_steps):
            steps.langevin_corrector_step(score_fn(x, t), x, snr, alpha=alpha, generator=generator, out=x, impl=impl)
        result, mean = steps.vp_sde_step(score_fn(x, t), x, beta, dt, generator=generator, return_mean=True,
                                         impl=impl)
        x = mean if (i == num_steps - 1 and denoise) else result
    return x


class ReplayBuffer:
    """The sample buffer of persistent SGLD (IGEBM, JEM): chains start from stored samples, or with
    probability reinit_prob from fresh noise drawn by init(n)."""

    def __init__(self, size: int, init: Callable, reinit_prob: float = 0.05, generator=None):
        if not 0 <= reinit_prob <= 1:
            raise ValueError(f"reinit_prob must be in [0, 1], got {reinit_prob}")
        self.init = init
        self.reinit_prob = reinit_prob
        self.generator = generator
        self.samples = init(size)

    def __len__(self):
        return self.samples.shape[0]

    def sample(self, n: int):
        """(starting points, their buffer indices), drawn on the generator's device (a CPU generator
        serves a buffer on a GPU, as random.uniforms draws) and moved to the buffer's."""
        device = self.samples.device
        drawn_on = self.generator.device if self.generator is not None else device
        index = torch.randint(0, len(self), (n,), generator=self.generator, device=drawn_on).to(device)
        x = self.samples[index]
        fresh = uniforms((n,), self.generator, device) < self.reinit_prob
        x = torch.where(fresh.reshape((-1,) + (1,) * (x.dim() - 1)), self.init(n).to(x), x)
        return x, index

    def push(self, x: torch.Tensor, index: torch.Tensor):
        self.samples[index] = x.detach()


def energy_and_gradient(energy_fn: Callable, x: torch.Tensor):
    """(E(x), -grad E(x)): the energies, one per sample, and the direction Langevin moves in."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        energy = energy_fn(x)
        (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach(), -grad


def energy_gradient(energy_fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """-grad E(x), from an energy function returning one value per sample."""
    return energy_and_gradient(energy_fn, x)[1]


def sgld(energy_fn: Callable, x: torch.Tensor, num_steps: int, step_size: float, *, noise_std: float = 0.01,
         grad_clip=None, clamp=None, generator=None, impl: str = "auto"):
    """Stochastic-gradient Langevin dynamics on an energy, as EBM training runs it: decoupled step
    size and noise (IGEBM's step 10 with noise 0.005, say), optional gradient clipping and clamping."""
    x = x.detach().clone()
    for _ in range(num_steps):
        steps.langevin_step(x, energy_gradient(energy_fn, x), step_size, noise_std=noise_std, grad_clip=grad_clip,
                            clamp=clamp, generator=generator, out=x, impl=impl)
    return x


def mala(energy_fn: Callable, x: torch.Tensor, num_steps: int, step_size: float, *, generator=None,
         impl: str = "auto"):
    """The Metropolis-adjusted Langevin algorithm: fused Langevin proposals, fused accept/reject.
    An exact sampler of exp(-E). Returns (samples, acceptance rate of each step as a device tensor)."""
    x = x.detach().clone()
    energy, grad = energy_and_gradient(energy_fn, x)
    rates = []
    for _ in range(num_steps):
        y = steps.langevin_step(x, grad, step_size, generator=generator, impl=impl)
        energy_y, grad_y = energy_and_gradient(energy_fn, y)
        result = steps.mala_accept(x, y, grad, grad_y, energy, energy_y, step_size, generator=generator,
                                   in_place=True, impl=impl)
        rates.append(result.acceptance_rate)
    return x, torch.stack(rates) if rates else torch.zeros(0, device=x.device)
