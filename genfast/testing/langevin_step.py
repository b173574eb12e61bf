"""sample_inputs of the Langevin-type updates, reused by the tests, `genfast check` and bench."""

from dataclasses import dataclass, field

import torch

import genfast


@dataclass(frozen=True)
class LangevinCase:
    name: str
    fn: object
    schedule: tuple  # positional schedule values after the two tensors
    options: dict = field(default_factory=dict)
    per_sample_options: tuple = ()  # options that become one value per sample in per-sample runs
    score_first: bool = False  # fn(score, x, ...) rather than fn(x, grad, ...)

    def __str__(self):
        return self.name


LANGEVIN_CASES = [
    LangevinCase("ula", genfast.langevin_step, (0.01,)),
    LangevinCase("decoupled_noise", genfast.langevin_step, (1.0,), dict(noise_std=0.01), ("noise_std",)),
    LangevinCase("grad_clip", genfast.langevin_step, (0.05,), dict(grad_clip=0.5)),
    LangevinCase("grad_norm_clip", genfast.langevin_step, (0.05,), dict(grad_norm_clip=1.5)),
    LangevinCase("clamp", genfast.langevin_step, (0.2,), dict(clamp=(-0.5, 1.0))),
    LangevinCase("ve_sde", genfast.ve_sde_step, (2.0, 1.5), score_first=True),
    LangevinCase("vp_sde_clamp", genfast.vp_sde_step, (5.0, 0.01), dict(clamp=(-1.0, 1.0)), score_first=True),
]


def make_langevin_inputs(case: LangevinCase, shape, dtype=torch.float32, device="cpu", *, noise=True,
                         per_sample_schedule=False):
    """(args, kwargs) for case.fn, with an explicit noise tensor unless noise=False."""
    gen = torch.Generator().manual_seed(4321)

    def rand():
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)

    x, g = rand(), rand()
    schedule = list(case.schedule)
    options = dict(case.options)
    if per_sample_schedule:
        factors = torch.linspace(0.5, 1.0, shape[0], dtype=torch.float32, device=device)
        schedule = [v * factors for v in schedule]
        for name in case.per_sample_options:
            options[name] = options[name] * factors
    if noise:
        options["noise"] = rand()
    first, second = (g, x) if case.score_first else (x, g)
    return [first, second, *schedule], options


def sample_of(case: LangevinCase, args):
    """The tensor the update moves (x), whichever position it takes."""
    return args[1] if case.score_first else args[0]
