"""The definition of every diffusion sampler step genfast fuses, in plain PyTorch.

Each function follows the corresponding diffusers scheduler's step() formula for formula, in
float64, and returns (prev_sample, pred_original_sample) in the sample's dtype. Schedule values
are Python floats or tensors with one value per sample. `noise` is a standard normal tensor of the
sample's shape, or None for a deterministic step.
"""

import math

import torch

from ._schedule import per_sample as _per_sample


def guided_output(model_output, model_output_cond=None, guidance_scale=None):
    """Classifier-free guidance: uncond + scale * (cond - uncond); the output itself without cond."""
    if model_output_cond is None:
        return model_output
    m, mc = model_output.double(), model_output_cond.double()
    return m + _per_sample(guidance_scale, m) * (mc - m)


def _prediction_to_x0_eps(prediction_type, x, m, alpha_prod_t):
    sqrt_a, sqrt_b = alpha_prod_t.sqrt(), (1 - alpha_prod_t).sqrt()
    if prediction_type == "epsilon":
        return (x - sqrt_b * m) / sqrt_a, m
    if prediction_type == "sample":
        return m, (x - sqrt_a * m) / sqrt_b
    if prediction_type == "v_prediction":
        return sqrt_a * x - sqrt_b * m, sqrt_a * m + sqrt_b * x
    raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")


def _finish(prev, x0, like):
    return prev.to(like.dtype), x0.to(like.dtype)


def ddpm_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise=None, *, prediction_type="epsilon",
              variance_type="fixed_small", clip_sample=False, clip_sample_range=1.0, add_noise=None,
              model_output_cond=None, guidance_scale=None):
    """DDPMScheduler.step. add_noise=None adds noise wherever alpha_prod_t_prev < 1."""
    x = sample.double()
    m = guided_output(model_output, model_output_cond, guidance_scale).double()
    a_t, a_prev = _per_sample(alpha_prod_t, x), _per_sample(alpha_prod_t_prev, x)
    beta_prod_t, beta_prod_t_prev = 1 - a_t, 1 - a_prev
    current_alpha_t = a_t / a_prev
    current_beta_t = 1 - current_alpha_t
    x0, _ = _prediction_to_x0_eps(prediction_type, x, m, a_t)
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    prev = (a_prev.sqrt() * current_beta_t / beta_prod_t) * x0 + (current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t) * x
    if variance_type == "fixed_small":
        std = ((1 - a_prev) / (1 - a_t) * current_beta_t).clamp(min=1e-20).sqrt()
    elif variance_type == "fixed_large":
        std = current_beta_t.sqrt()
    else:
        raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got {variance_type!r}")
    if add_noise is None:
        std = torch.where(a_prev < 1, std, torch.zeros_like(std))
    if noise is not None and add_noise is not False:
        prev = prev + std * noise.double()
    return _finish(prev, x0, sample)


def ddim_variance(alpha_prod_t, alpha_prod_t_prev):
    return (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise=None, *, eta=0.0,
              prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0, use_clipped_model_output=False,
              model_output_cond=None, guidance_scale=None):
    """DDIMScheduler.step."""
    x = sample.double()
    m = guided_output(model_output, model_output_cond, guidance_scale).double()
    a_t, a_prev = _per_sample(alpha_prod_t, x), _per_sample(alpha_prod_t_prev, x)
    x0, eps = _prediction_to_x0_eps(prediction_type, x, m, a_t)
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    std = _per_sample(eta, x) * ddim_variance(a_t, a_prev).sqrt()
    if use_clipped_model_output:
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    prev = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if noise is not None:
        prev = prev + std * noise.double()
    return _finish(prev, x0, sample)


def euler_gamma(sigma, s_churn, num_inference_steps, s_tmin, s_tmax):
    """EulerDiscreteScheduler's churn factor: min(s_churn / steps, sqrt(2) - 1) inside [s_tmin, s_tmax]."""
    if s_churn == 0:
        return torch.zeros_like(sigma)
    gamma = min(s_churn / num_inference_steps, math.sqrt(2.0) - 1)
    inside = (sigma >= s_tmin) & (sigma <= s_tmax)
    return torch.where(inside, torch.full_like(sigma, gamma), torch.zeros_like(sigma))


def euler_step(model_output, sample, sigma, sigma_next, noise=None, *, prediction_type="epsilon", s_churn=0.0,
               s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, num_inference_steps=None, model_output_cond=None,
               guidance_scale=None):
    """EulerDiscreteScheduler.step (num_inference_steps is len(scheduler.sigmas) - 1)."""
    x = sample.double()
    m = guided_output(model_output, model_output_cond, guidance_scale).double()
    sigma_t, sigma_n = _per_sample(sigma, x), _per_sample(sigma_next, x)
    gamma = euler_gamma(sigma_t, s_churn, num_inference_steps, s_tmin, s_tmax)
    sigma_hat = sigma_t * (gamma + 1)
    if noise is not None:
        x = x + noise.double() * s_noise * (sigma_hat**2 - sigma_t**2).sqrt()
    if prediction_type in ("sample", "original_sample"):
        x0 = m
    elif prediction_type == "epsilon":
        x0 = x - sigma_hat * m
    elif prediction_type == "v_prediction":
        x0 = m * (-sigma_t / (sigma_t**2 + 1).sqrt()) + x / (sigma_t**2 + 1)
    else:
        raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")
    derivative = (x - x0) / sigma_hat
    prev = x + derivative * (sigma_n - sigma_hat)
    return _finish(prev, x0, sample)


def flow_match_euler_step(model_output, sample, sigma, sigma_next, noise=None, *, stochastic_sampling=False,
                          model_output_cond=None, guidance_scale=None):
    """FlowMatchEulerDiscreteScheduler.step: x + (sigma_next - sigma) * v, or its stochastic form."""
    x = sample.double()
    v = guided_output(model_output, model_output_cond, guidance_scale).double()
    sigma_t, sigma_n = _per_sample(sigma, x), _per_sample(sigma_next, x)
    x0 = x - sigma_t * v
    if stochastic_sampling:
        prev = (1 - sigma_n) * x0 + sigma_n * noise.double()
    else:
        prev = x + (sigma_n - sigma_t) * v
    return _finish(prev, x0, sample)


def flow_match_heun_step(model_output, sample, sigma, sigma_next, first_velocity=None, *, model_output_cond=None,
                         guidance_scale=None):
    """Heun for flow matching. Without first_velocity: the Euler predictor x + dt * v. With the
    first stage's velocity: the corrector x + dt * (v1 + v2) / 2, where `sample` is the sample the
    step started from and model_output the velocity at the predicted point. The second output is
    x - sigma * model_output in both stages."""
    x = sample.double()
    v = guided_output(model_output, model_output_cond, guidance_scale).double()
    sigma_t, sigma_n = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sigma_n - sigma_t
    if first_velocity is None:
        prev = x + dt * v
    else:
        prev = x + dt * (first_velocity.double() + v) / 2
    return _finish(prev, x - sigma_t * v, sample)
