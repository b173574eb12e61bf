"""sample_inputs of the denoise step: one list of cases reused by the tests, `genfast check` and bench."""

from dataclasses import dataclass, field

import torch

import genfast


@dataclass(frozen=True)
class DenoiseCase:
    name: str
    fn: object
    schedule: tuple  # positional schedule values after (model_output, sample)
    options: dict = field(default_factory=dict)
    stochastic: bool = False  # draws noise
    guided: bool = False  # classifier-free guidance with model_output_cond
    heun_corrector: bool = False  # passes first_velocity
    pred_original: bool = True  # supports return_pred_original

    def __str__(self):
        return self.name


DENOISE_CASES = [
    DenoiseCase("ddpm_epsilon_fixed_small", genfast.ddpm_step, (0.35, 0.42), stochastic=True),
    DenoiseCase("ddpm_v_fixed_large_clip", genfast.ddpm_step, (0.35, 0.42),
                dict(prediction_type="v_prediction", variance_type="fixed_large", clip_sample=True,
                     clip_sample_range=1.5), stochastic=True),
    DenoiseCase("ddpm_sample_last_step", genfast.ddpm_step, (0.97, 1.0), dict(prediction_type="sample")),
    DenoiseCase("ddim_eta0_epsilon", genfast.ddim_step, (0.35, 0.6)),
    DenoiseCase("ddim_eta_v_clip_clipped_output", genfast.ddim_step, (0.35, 0.6),
                dict(eta=0.7, prediction_type="v_prediction", clip_sample=True, clip_sample_range=1.0,
                     use_clipped_model_output=True), stochastic=True),
    DenoiseCase("ddim_eta1_sample", genfast.ddim_step, (0.5, 0.7), dict(eta=1.0, prediction_type="sample"),
                stochastic=True),
    DenoiseCase("ddim_guided", genfast.ddim_step, (0.35, 0.6), dict(guidance_scale=7.5), guided=True),
    DenoiseCase("euler_epsilon", genfast.euler_step, (2.5, 1.7)),
    DenoiseCase("euler_v_churn", genfast.euler_step, (2.5, 1.7),
                dict(prediction_type="v_prediction", s_churn=0.8, num_inference_steps=10, s_noise=1.003),
                stochastic=True),
    DenoiseCase("euler_sample_last", genfast.euler_step, (0.03, 0.0), dict(prediction_type="sample")),
    DenoiseCase("euler_guided", genfast.euler_step, (1.2, 0.9), dict(guidance_scale=3.0), guided=True),
    DenoiseCase("flow_match_euler", genfast.flow_match_euler_step, (0.8, 0.6)),
    DenoiseCase("flow_match_euler_stochastic", genfast.flow_match_euler_step, (0.8, 0.6),
                dict(stochastic_sampling=True), stochastic=True),
    DenoiseCase("flow_match_heun_predictor", genfast.flow_match_heun_step, (0.8, 0.6), pred_original=False),
    DenoiseCase("flow_match_heun_corrector", genfast.flow_match_heun_step, (0.8, 0.6), heun_corrector=True,
                pred_original=False),
]

STOCHASTIC_CASES = [c for c in DENOISE_CASES if c.stochastic]

SHAPES = [(2, 3, 5, 7), (1, 1), (3, 1027), (4, 8, 8)]


def per_sample(value, batch, device):
    """A schedule value spread over the batch, staying in its valid range (factors in (0, 1])."""
    return value * torch.linspace(0.85, 1.0, batch, dtype=torch.float32, device=device)


def make_denoise_inputs(case: DenoiseCase, shape, dtype=torch.float32, device="cpu", *, noise=True,
                        per_sample_schedule=False):
    """(args, kwargs) for case.fn, with an explicit noise tensor unless noise=False."""
    gen = torch.Generator().manual_seed(1234)

    def rand():
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)

    sample, model_output = rand(), rand()
    schedule = list(case.schedule)
    options = dict(case.options)
    if per_sample_schedule:
        batch = shape[0]
        schedule = [per_sample(v, batch, device) for v in schedule]
        if "guidance_scale" in options:
            options["guidance_scale"] = per_sample(options["guidance_scale"], batch, device)
    kwargs = options
    if case.guided:
        kwargs["model_output_cond"] = rand()
    if case.heun_corrector:
        kwargs["first_velocity"] = rand()
    if noise and case.fn is not genfast.flow_match_heun_step:
        # also for deterministic cases: per-sample schedules can make a case stochastic, and a
        # noise tensor with a zero coefficient must leave the result alone
        kwargs["noise"] = rand()
    return [model_output, sample, *schedule], kwargs
