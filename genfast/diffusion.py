"""Fused diffusion sampler steps: one pass over memory per step, noise drawn inside the kernel.

Every function computes what the matching diffusers scheduler's step() computes (see
genfast.reference.diffusion, the definition), given the schedule values of the step instead of a
timestep index. Schedule values are floats or tensors holding one value per sample; tensors are
never read on the host, so a sampling loop runs without a device synchronization.

Noise: pass `noise` (a standard normal tensor of the sample's shape) for exact comparability with
any other implementation, or a `generator` (torch.Generator or genfast.PhiloxGenerator) for
in-kernel Philox noise; see genfast.random.
"""

import math
from typing import Optional, Union

import torch

from . import _backend, _checks
from ._coefs import as_float64 as _as_float64, is_zero as _is_zero, pack_rows, sqrt as _sqrt
from .ops import denoise_step as denoise_op
from ._dispatch import noise_key, run_reference
from .random import as_int64
from .reference import diffusion as reference

Schedule = Union[float, torch.Tensor]
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large")

# Coefficient slots, in the order of kernels/common/denoise_step.h.
G, AX, AM, AZ, O0, OX, OM, OZ, OD = range(9)


def _pack(coefs, clip: bool, device):
    """The kernel's coefficients (see _coefs.pack_rows). Without a clamp x0 is affine too, so its
    terms fold into the output's; this keeps fp32 cancellation (x' - (x' - sigma * m) in Euler)
    out of the kernel."""
    coefs = list(coefs)
    if not clip:
        for x0_slot, out_slot in ((AX, OX), (AM, OM), (AZ, OZ)):
            coefs[out_slot] = coefs[out_slot] + coefs[O0] * coefs[x0_slot]
        coefs[O0] = 0.0
    return pack_rows(coefs, device)


def _prediction_coefs(prediction_type, alpha_prod_t):
    """x0 = ax * x + am * m and eps = ex * x + em * m for a model predicting `prediction_type`."""
    sqrt_a, sqrt_b = _sqrt(alpha_prod_t), _sqrt(1 - alpha_prod_t)
    if prediction_type == "epsilon":
        return 1 / sqrt_a, -sqrt_b / sqrt_a, 0.0, 1.0
    if prediction_type == "sample":
        return 0.0, 1.0, 1 / sqrt_b, -sqrt_a / sqrt_b
    return sqrt_a, -sqrt_b, sqrt_b, sqrt_a  # v_prediction


def _check_common(model_output, sample, model_output_cond, guidance_scale, noise, out, impl):
    _checks.check_float_tensor("sample", sample)
    _checks.check_like("model_output", model_output, sample)
    if model_output_cond is not None:
        _checks.check_like("model_output_cond", model_output_cond, sample)
        if guidance_scale is None:
            raise ValueError("guidance_scale is required with model_output_cond")
        _checks.check_schedule_value("guidance_scale", guidance_scale, sample)
    if noise is not None:
        _checks.check_like("noise", noise, sample)
    if out is not None:
        _checks.check_like("out", out, sample)
    _checks.check_choice("impl", impl, _backend.IMPLS)


def _check_clip_range(clip_sample_range, sample):
    """A number: the kernels take the clamp's bounds as scalars (a tensor's value would be read on the host)."""
    if isinstance(clip_sample_range, torch.Tensor):
        raise TypeError("clip_sample_range must be a float, got a tensor")
    _checks.check_schedule_value("clip_sample_range", clip_sample_range, sample, low=0, low_open=True)


def _step(sample, model_output, *, coefs, clip, clip_range, needs_noise, reference_step, model_output_cond,
          guidance_scale, derivative, noise, generator, out, return_pred_original, impl):
    backend = _backend.resolve_impl(impl, sample.device)
    cuda_generator, key = noise_key(needs_noise, noise, generator, sample.device, backend)
    if backend == "reference":
        return run_reference(reference_step, sample, noise, key, out, return_pred_original)

    coefs = [_as_float64(c) for c in coefs]
    coefs[G] = _as_float64(guidance_scale if guidance_scale is not None else 1.0)
    row_coefs, scalar_coefs = _pack(coefs, clip, sample.device)
    if out is None:
        out = torch.empty_like(sample, memory_format=torch.contiguous_format)
    pred_original = torch.empty_like(out) if return_pred_original else None
    seed, offset = key if key is not None else (0, 0)
    philox_noise = key is not None or cuda_generator is not None
    denoise_op.run(backend, sample, model_output, model_output_cond, derivative, noise, row_coefs, scalar_coefs,
                   bool(clip), -float(clip_range), float(clip_range), philox_noise, cuda_generator, as_int64(seed),
                   as_int64(offset), out, pred_original)
    return (out, pred_original) if return_pred_original else out


def ddpm_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: Schedule, alpha_prod_t_prev: Schedule,
              *, prediction_type: str = "epsilon", variance_type: str = "fixed_small", clip_sample: bool = False,
              clip_sample_range: float = 1.0, model_output_cond: Optional[torch.Tensor] = None,
              guidance_scale: Optional[Schedule] = None, add_noise: Optional[bool] = None,
              noise: Optional[torch.Tensor] = None, generator=None, out: Optional[torch.Tensor] = None,
              return_pred_original: bool = False, impl: str = "auto"):
    """One DDPM ancestral step (diffusers' DDPMScheduler.step), fused.

    alpha_prod_t / alpha_prod_t_prev: cumulative alphas at this step and the previous one
    (1.0 on the last step). add_noise: whether to add the step's noise; by default wherever
    alpha_prod_t_prev < 1 (diffusers adds it wherever the timestep is > 0). With model_output_cond and guidance_scale the
    classifier-free-guided output uncond + scale * (cond - uncond) is formed in the same pass.
    Returns the previous sample, or (previous sample, predicted original sample).
    """
    _check_common(model_output, sample, model_output_cond, guidance_scale, noise, out, impl)
    _checks.check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _checks.check_choice("variance_type", variance_type, VARIANCE_TYPES)
    _checks.check_schedule_value("alpha_prod_t", alpha_prod_t, sample, low=0, high=1, low_open=True)
    _checks.check_schedule_value("alpha_prod_t_prev", alpha_prod_t_prev, sample, low=0, high=1, low_open=True)
    if clip_sample:
        _check_clip_range(clip_sample_range, sample)

    a_t, a_prev = _as_float64(alpha_prod_t), _as_float64(alpha_prod_t_prev)
    ax, am, _, _ = _prediction_coefs(prediction_type, a_t)
    current_alpha = a_t / a_prev
    current_beta = 1 - current_alpha
    if variance_type == "fixed_small":
        variance = (1 - a_prev) / (1 - a_t) * current_beta
        variance = variance.clamp(min=1e-20) if isinstance(variance, torch.Tensor) else max(variance, 1e-20)
        std = _sqrt(variance)
    else:
        std = _sqrt(current_beta)
    if add_noise is False:
        std = 0.0
    elif add_noise is None and isinstance(a_prev, torch.Tensor):  # the last step, into x0, adds no noise
        std = torch.where(a_prev < 1, std, 0.0)
    elif add_noise is None and a_prev >= 1:
        std = 0.0
    coefs = [1.0, ax, am, 0.0, _sqrt(a_prev) * current_beta / (1 - a_t),
             _sqrt(current_alpha) * (1 - a_prev) / (1 - a_t), 0.0, std, 0.0]

    def reference_step(z):
        return reference.ddpm_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, z,
                                   prediction_type=prediction_type, variance_type=variance_type,
                                   clip_sample=clip_sample, clip_sample_range=clip_sample_range, add_noise=add_noise,
                                   model_output_cond=model_output_cond, guidance_scale=guidance_scale)

    return _step(sample, model_output, coefs=coefs, clip=clip_sample, clip_range=clip_sample_range,
                 needs_noise=not _is_zero(std), reference_step=reference_step, model_output_cond=model_output_cond,
                 guidance_scale=guidance_scale, derivative=None, noise=noise, generator=generator, out=out,
                 return_pred_original=return_pred_original, impl=impl)


def ddim_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: Schedule, alpha_prod_t_prev: Schedule,
              *, eta: Schedule = 0.0, prediction_type: str = "epsilon", clip_sample: bool = False,
              clip_sample_range: float = 1.0, use_clipped_model_output: bool = False,
              model_output_cond: Optional[torch.Tensor] = None, guidance_scale: Optional[Schedule] = None,
              noise: Optional[torch.Tensor] = None, generator=None, out: Optional[torch.Tensor] = None,
              return_pred_original: bool = False, impl: str = "auto"):
    """One DDIM step (diffusers' DDIMScheduler.step), fused; eta = 0 is deterministic."""
    _check_common(model_output, sample, model_output_cond, guidance_scale, noise, out, impl)
    _checks.check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _checks.check_schedule_value("alpha_prod_t", alpha_prod_t, sample, low=0, high=1, low_open=True)
    _checks.check_schedule_value("alpha_prod_t_prev", alpha_prod_t_prev, sample, low=0, high=1, low_open=True)
    _checks.check_schedule_value("eta", eta, sample, low=0)
    if clip_sample:
        _check_clip_range(clip_sample_range, sample)

    a_t, a_prev = _as_float64(alpha_prod_t), _as_float64(alpha_prod_t_prev)
    eta64 = _as_float64(eta)
    ax, am, ex, em = _prediction_coefs(prediction_type, a_t)
    std = eta64 * _sqrt(reference.ddim_variance(a_t, a_prev))
    direction = _sqrt(1 - a_prev - std**2)
    e0 = 0.0
    if use_clipped_model_output:
        ex, em, e0 = 1 / _sqrt(1 - a_t), 0.0, -_sqrt(a_t) / _sqrt(1 - a_t)
    coefs = [1.0, ax, am, 0.0, _sqrt(a_prev) + direction * e0, direction * ex, direction * em, std, 0.0]

    def reference_step(z):
        return reference.ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, z, eta=eta,
                                   prediction_type=prediction_type, clip_sample=clip_sample,
                                   clip_sample_range=clip_sample_range,
                                   use_clipped_model_output=use_clipped_model_output,
                                   model_output_cond=model_output_cond, guidance_scale=guidance_scale)

    return _step(sample, model_output, coefs=coefs, clip=clip_sample, clip_range=clip_sample_range,
                 needs_noise=not _is_zero(eta64), reference_step=reference_step, model_output_cond=model_output_cond,
                 guidance_scale=guidance_scale, derivative=None, noise=noise, generator=generator, out=out,
                 return_pred_original=return_pred_original, impl=impl)


def euler_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: Schedule, sigma_next: Schedule, *,
               prediction_type: str = "epsilon", s_churn: float = 0.0, s_tmin: float = 0.0,
               s_tmax: float = float("inf"), s_noise: float = 1.0, num_inference_steps: Optional[int] = None,
               model_output_cond: Optional[torch.Tensor] = None, guidance_scale: Optional[Schedule] = None,
               noise: Optional[torch.Tensor] = None, generator=None, out: Optional[torch.Tensor] = None,
               return_pred_original: bool = False, impl: str = "auto"):
    """One Euler step of diffusers' EulerDiscreteScheduler, fused (churn needs num_inference_steps)."""
    _check_common(model_output, sample, model_output_cond, guidance_scale, noise, out, impl)
    _checks.check_choice("prediction_type", prediction_type, PREDICTION_TYPES + ("original_sample",))
    _checks.check_schedule_value("sigma", sigma, sample, low=0, low_open=True)
    _checks.check_schedule_value("sigma_next", sigma_next, sample, low=0)
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}")
    if s_churn > 0 and (num_inference_steps is None or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be a positive int when s_churn > 0, got {num_inference_steps}")

    sigma64, sigma_next64 = _as_float64(sigma), _as_float64(sigma_next)
    if isinstance(sigma64, torch.Tensor):
        gamma = reference.euler_gamma(sigma64, s_churn, num_inference_steps, s_tmin, s_tmax)
    else:
        inside = s_tmin <= sigma64 <= s_tmax
        gamma = min(s_churn / num_inference_steps, math.sqrt(2.0) - 1) if s_churn > 0 and inside else 0.0
    sigma_hat = sigma64 * (gamma + 1)
    churn = s_noise * _sqrt(sigma_hat**2 - sigma64**2)  # x' = x + churn * z
    if prediction_type == "epsilon":
        ax, am, az = 1.0, -sigma_hat, churn
    elif prediction_type == "v_prediction":
        ax, am, az = 1 / (sigma64**2 + 1), -sigma64 / _sqrt(sigma64**2 + 1), churn / (sigma64**2 + 1)
    else:
        ax, am, az = 0.0, 1.0, 0.0
    ratio = (sigma_next64 - sigma_hat) / sigma_hat
    coefs = [1.0, ax, am, az, -ratio, 1 + ratio, 0.0, churn * (1 + ratio), 0.0]

    def reference_step(z):
        return reference.euler_step(model_output, sample, sigma, sigma_next, z, prediction_type=prediction_type,
                                    s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                                    num_inference_steps=num_inference_steps, model_output_cond=model_output_cond,
                                    guidance_scale=guidance_scale)

    # s_churn = 0 adds no noise, whatever sigma is (a tensor's gamma is zeros, not known zero here)
    return _step(sample, model_output, coefs=coefs, clip=False, clip_range=1.0,
                 needs_noise=s_churn > 0 and not _is_zero(gamma),
                 reference_step=reference_step, model_output_cond=model_output_cond, guidance_scale=guidance_scale,
                 derivative=None, noise=noise, generator=generator, out=out,
                 return_pred_original=return_pred_original, impl=impl)


def flow_match_euler_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: Schedule, sigma_next: Schedule,
                          *, stochastic_sampling: bool = False, model_output_cond: Optional[torch.Tensor] = None,
                          guidance_scale: Optional[Schedule] = None, noise: Optional[torch.Tensor] = None,
                          generator=None, out: Optional[torch.Tensor] = None, return_pred_original: bool = False,
                          impl: str = "auto"):
    """x + (sigma_next - sigma) * v (diffusers' FlowMatchEulerDiscreteScheduler.step), fused;
    with stochastic_sampling, (1 - sigma_next) * (x - sigma * v) + sigma_next * z."""
    _check_common(model_output, sample, model_output_cond, guidance_scale, noise, out, impl)
    _checks.check_schedule_value("sigma", sigma, sample)
    _checks.check_schedule_value("sigma_next", sigma_next, sample)
    sigma64, sigma_next64 = _as_float64(sigma), _as_float64(sigma_next)
    if stochastic_sampling:
        coefs = [1.0, 1.0, -sigma64, 0.0, 1 - sigma_next64, 0.0, 0.0, sigma_next64, 0.0]
    else:
        coefs = [1.0, 1.0, -sigma64, 0.0, 0.0, 1.0, sigma_next64 - sigma64, 0.0, 0.0]

    def reference_step(z):
        return reference.flow_match_euler_step(model_output, sample, sigma, sigma_next, z,
                                               stochastic_sampling=stochastic_sampling,
                                               model_output_cond=model_output_cond, guidance_scale=guidance_scale)

    return _step(sample, model_output, coefs=coefs, clip=False, clip_range=1.0, needs_noise=stochastic_sampling,
                 reference_step=reference_step, model_output_cond=model_output_cond, guidance_scale=guidance_scale,
                 derivative=None, noise=noise, generator=generator, out=out,
                 return_pred_original=return_pred_original, impl=impl)


def flow_match_heun_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: Schedule, sigma_next: Schedule,
                         *, first_velocity: Optional[torch.Tensor] = None,
                         model_output_cond: Optional[torch.Tensor] = None, guidance_scale: Optional[Schedule] = None,
                         out: Optional[torch.Tensor] = None, impl: str = "auto"):
    """Heun's method for flow matching, one fused pass per stage.

    Stage 1 (first_velocity=None): x + dt * v, the predictor. Stage 2: pass the step's starting
    sample, the velocity at the predicted point as model_output and stage 1's velocity as
    first_velocity: x + dt * (v1 + v2) / 2."""
    _check_common(model_output, sample, model_output_cond, guidance_scale, None, out, impl)
    if first_velocity is not None:
        _checks.check_like("first_velocity", first_velocity, sample)
    _checks.check_schedule_value("sigma", sigma, sample)
    _checks.check_schedule_value("sigma_next", sigma_next, sample)
    sigma64, sigma_next64 = _as_float64(sigma), _as_float64(sigma_next)
    dt = sigma_next64 - sigma64
    if first_velocity is None:
        coefs = [1.0, 1.0, -sigma64, 0.0, 0.0, 1.0, dt, 0.0, 0.0]
    else:
        coefs = [1.0, 1.0, -sigma64, 0.0, 0.0, 1.0, dt / 2, 0.0, dt / 2]

    def reference_step(z):
        return reference.flow_match_heun_step(model_output, sample, sigma, sigma_next, first_velocity,
                                              model_output_cond=model_output_cond, guidance_scale=guidance_scale)

    return _step(sample, model_output, coefs=coefs, clip=False, clip_range=1.0, needs_noise=False,
                 reference_step=reference_step, model_output_cond=model_output_cond, guidance_scale=guidance_scale,
                 derivative=first_velocity, noise=None, generator=None, out=out, return_pred_original=False,
                 impl=impl)
