"""Fused Langevin-type updates for energy-based and score-based models: one pass over memory,
noise drawn inside the kernel.

langevin_step is the unadjusted Langevin algorithm's step x + eps * grad + sigma * z (grad is the
score, or minus the energy's gradient), with gradient clipping and clamping fused in; ve_sde_step
and vp_sde_step are the reverse-SDE predictors of score_sde. Schedule values (step sizes, noise
levels, sigmas, betas) are floats or tensors with one value per sample and are never read on the
host. Noise: `noise=` or `generator=`, exactly as in genfast.diffusion.
"""

from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import _backend, _checks
from ._coefs import as_float64, is_zero, pack_rows, sqrt
from .ops import langevin_corrector_step as corrector_op
from .ops import langevin_step as langevin_op
from .ops import mala_accept as mala_op
from ._dispatch import noise_key, run_reference
from .random import as_int64, uniforms as random_uniforms
from .reference import langevin as reference

Schedule = Union[float, torch.Tensor]
INF = float("inf")


def _check_common(x, grad, noise, out, clamp, impl, grad_name="grad"):
    _checks.check_float_tensor("x", x)
    _checks.check_like(grad_name, grad, x, "x")
    if noise is not None:
        _checks.check_like("noise", noise, x, "x")
    if out is not None:
        _checks.check_like("out", out, x, "x")
    if clamp is not None:
        if len(clamp) != 2 or not all(isinstance(v, (int, float)) for v in clamp):
            raise TypeError(f"clamp must be a pair of floats (lo, hi), got {clamp!r}")
        if clamp[0] > clamp[1]:
            raise ValueError(f"clamp must have lo <= hi, got lo = {clamp[0]} > hi = {clamp[1]}")
    _checks.check_choice("impl", impl, _backend.IMPLS)


def _update(x, grad, *, x_scale, step, noise_std, grad_clip, grad_scale, clamp, noise, generator, out, return_mean,
            impl, reference_step):
    """Runs x_scale * x + step * clip(grad) * grad_scale + noise_std * z on the resolved backend."""
    backend = _backend.resolve_impl(impl, x.device)
    cuda_generator, key = noise_key(not is_zero(noise_std), noise, generator, x.device, backend)
    if backend == "reference":
        return run_reference(reference_step, x, noise, key, out, return_mean)

    row_coefs, coefs = pack_rows([x_scale, step, noise_std, grad_scale], x.device)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean_out = torch.empty_like(out) if return_mean else None
    lo, hi = (float(clamp[0]), float(clamp[1])) if clamp is not None else (-INF, INF)
    seed, offset = key if key is not None else (0, 0)
    langevin_op.run(backend, x, grad, noise, row_coefs, coefs, INF if grad_clip is None else float(grad_clip), lo, hi,
                    key is not None or cuda_generator is not None, cuda_generator, as_int64(seed), as_int64(offset),
                    out, mean_out)
    return (out, mean_out) if return_mean else out


def _gradient_norm_scale(grad, grad_norm_clip):
    """Per-sample factor min(1, c / ||grad||): one pass over grad, on the device, no sync."""
    norms = torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1).float(), dim=1).double()
    return (grad_norm_clip / norms).clamp(max=1.0)


def langevin_step(x: torch.Tensor, grad: torch.Tensor, step_size: Schedule, *, noise_std: Optional[Schedule] = None,
                  grad_clip: Optional[float] = None, grad_norm_clip: Optional[float] = None,
                  clamp: Optional[Tuple[float, float]] = None, noise: Optional[torch.Tensor] = None, generator=None,
                  out: Optional[torch.Tensor] = None, return_mean: bool = False, impl: str = "auto"):
    """One Langevin step, fused: x + step_size * g + noise_std * z.

    grad: the score (gradient of log p), or minus the gradient of an energy. noise_std defaults to
    sqrt(2 * step_size), the unadjusted Langevin algorithm; EBM training often decouples them (step
    1.0 with noise 0.01). grad_clip clips g elementwise to [-c, c]; grad_norm_clip rescales each
    sample's gradient to an L2 norm of at most c. clamp=(lo, hi) clamps the result (images in [0, 1]).
    return_mean also returns the update without its noise.
    """
    _check_common(x, grad, noise, out, clamp, impl)
    _checks.check_schedule_value("step_size", step_size, x, low=0)
    if noise_std is not None:
        _checks.check_schedule_value("noise_std", noise_std, x, low=0)
    if grad_clip is not None and grad_norm_clip is not None:
        raise ValueError("pass grad_clip or grad_norm_clip, not both")
    for name, value in (("grad_clip", grad_clip), ("grad_norm_clip", grad_norm_clip)):
        if value is not None:
            _checks.check_schedule_value(name, value, x, low=0, low_open=True)
            if isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a float, got a tensor")
    if grad_norm_clip is not None and x.dim() == 0:
        raise ValueError("grad_norm_clip needs x with a batch dimension, got a 0-d tensor")

    step = as_float64(step_size)
    std = sqrt(2 * step) if noise_std is None else as_float64(noise_std)
    grad_scale = 1.0
    if grad_norm_clip is not None and x.numel() > 0 and _backend.resolve_impl(impl, x.device) != "reference":
        grad_scale = _gradient_norm_scale(grad, grad_norm_clip)  # the reference clips on its own

    def reference_step(z):
        return reference.langevin_step(x, grad, step_size, z, noise_std=noise_std, grad_clip=grad_clip,
                                       grad_norm_clip=grad_norm_clip, clamp=clamp)

    return _update(x, grad, x_scale=1.0, step=step, noise_std=std, grad_clip=grad_clip, grad_scale=grad_scale,
                   clamp=clamp, noise=noise, generator=generator, out=out, return_mean=return_mean, impl=impl,
                   reference_step=reference_step)


def ve_sde_step(score: torch.Tensor, x: torch.Tensor, sigma: Schedule, sigma_next: Schedule, *,
                clamp: Optional[Tuple[float, float]] = None, noise: Optional[torch.Tensor] = None, generator=None,
                out: Optional[torch.Tensor] = None, return_mean: bool = False, impl: str = "auto"):
    """One reverse-VE-SDE predictor step, fused (score_sde's ReverseDiffusionPredictor for the VE
    SDE): x + (sigma^2 - sigma_next^2) * score + sqrt(sigma^2 - sigma_next^2) * z."""
    _check_common(x, score, noise, out, clamp, impl, grad_name="score")
    _checks.check_schedule_value("sigma", sigma, x, low=0)
    _checks.check_schedule_value("sigma_next", sigma_next, x, low=0)
    if not isinstance(sigma, torch.Tensor) and not isinstance(sigma_next, torch.Tensor) and sigma_next > sigma:
        raise ValueError(f"sigma_next must be <= sigma, got sigma_next = {sigma_next} > sigma = {sigma}")
    s, s_next = as_float64(sigma), as_float64(sigma_next)
    g2 = s**2 - s_next**2

    def reference_step(z):
        return reference.ve_sde_step(score, x, sigma, sigma_next, z, clamp=clamp)

    return _update(x, score, x_scale=1.0, step=g2, noise_std=sqrt(g2), grad_clip=None, grad_scale=1.0, clamp=clamp,
                   noise=noise, generator=generator, out=out, return_mean=return_mean, impl=impl,
                   reference_step=reference_step)


def vp_sde_step(score: torch.Tensor, x: torch.Tensor, beta: Schedule, dt: Schedule, *,
                clamp: Optional[Tuple[float, float]] = None, noise: Optional[torch.Tensor] = None, generator=None,
                out: Optional[torch.Tensor] = None, return_mean: bool = False, impl: str = "auto"):
    """One reverse-VP-SDE Euler-Maruyama step, fused (score_sde's EulerMaruyamaPredictor for the VP
    SDE): with beta = beta(t) and dt > 0 the step back in time,
    x * (1 + beta dt / 2) + beta dt * score + sqrt(beta dt) * z."""
    _check_common(x, score, noise, out, clamp, impl, grad_name="score")
    _checks.check_schedule_value("beta", beta, x, low=0)
    _checks.check_schedule_value("dt", dt, x, low=0)
    b, h = as_float64(beta), as_float64(dt)

    def reference_step(z):
        return reference.vp_sde_step(score, x, beta, dt, z, clamp=clamp)

    return _update(x, score, x_scale=1 + 0.5 * b * h, step=b * h, noise_std=sqrt(b * h), grad_clip=None,
                   grad_scale=1.0, clamp=clamp, noise=noise, generator=generator, out=out, return_mean=return_mean,
                   impl=impl, reference_step=reference_step)


def langevin_corrector_step(score: torch.Tensor, x: torch.Tensor, snr: float, *, alpha: Schedule = 1.0,
                            per_sample_norms: bool = False, noise: Optional[torch.Tensor] = None, generator=None,
                            out: Optional[torch.Tensor] = None, return_mean: bool = False, impl: str = "auto"):
    """One step of score_sde's Langevin corrector, fused: eps = 2 * alpha * (snr * ||z|| / ||score||)^2
    and x + eps * score + sqrt(2 * eps) * z.

    The norms are over each sample; as in score_sde their batch means set one step size, or with
    per_sample_norms each sample gets its own. alpha is 1 for the VE SDE and the schedule's alpha
    at t for the VP SDE (a float or one value per sample). With in-kernel noise the noise is never
    written to memory: one pass computes its norms, the update draws it again, so the step reads x
    once and the score twice. Nothing is read on the host.
    """
    _check_common(x, score, noise, out, None, impl, grad_name="score")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    _checks.check_schedule_value("snr", snr, x, low=0)
    if isinstance(snr, torch.Tensor):
        raise TypeError("snr must be a float, got a tensor")
    _checks.check_schedule_value("alpha", alpha, x, low=0)
    backend = _backend.resolve_impl(impl, x.device)
    cuda_generator, key = noise_key(True, noise, generator, x.device, backend)

    if backend == "reference":
        def reference_step(z):
            return reference.langevin_corrector_step(score, x, snr, z, alpha=alpha, per_sample_norms=per_sample_norms)

        return run_reference(reference_step, x, noise, key, out, return_mean)

    alpha_tensor = alpha if isinstance(alpha, torch.Tensor) else torch.full((1,), float(alpha), device=x.device)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean_out = torch.empty_like(out) if return_mean else None
    seed, offset = key if key is not None else (0, 0)
    corrector_op.run(backend, x, score, noise, alpha_tensor.float().reshape(-1), float(snr), per_sample_norms,
                     key is not None or cuda_generator is not None, cuda_generator, as_int64(seed), as_int64(offset),
                     out, mean_out)
    return (out, mean_out) if return_mean else out


class MalaResult(NamedTuple):
    x: torch.Tensor  # the chain's samples after the step
    grad: torch.Tensor  # grad log p at them
    energy: torch.Tensor  # their energies, one per sample
    accepted: torch.Tensor  # bool, one per sample
    acceptance_rate: torch.Tensor  # a 0-d device tensor: reading it is the caller's choice


def mala_accept(x: torch.Tensor, y: torch.Tensor, grad_x: torch.Tensor, grad_y: torch.Tensor,
                energy_x: torch.Tensor, energy_y: torch.Tensor, step_size: Schedule, *,
                uniform: Optional[torch.Tensor] = None, generator=None, in_place: bool = False,
                impl: str = "auto") -> MalaResult:
    """The Metropolis-adjusted Langevin algorithm's accept/reject, fused: two passes over memory.

    y is the proposal x + step_size * grad_x + sqrt(2 * step_size) * z (genfast.langevin_step
    makes it); grad_* are grad log p (minus the energy's gradient) and energy_* one energy per
    sample at x and y. Each sample keeps y with probability
    min(1, exp(E(x) - E(y) + log q(x | y) - log q(y | x))). uniform: the U(0, 1) draws, one per
    sample, or drawn from generator. in_place writes the kept state into x, grad_x and energy_x,
    where only accepted samples are copied. A NaN rejects the proposal.
    """
    _check_common(x, y, None, None, None, impl, grad_name="y")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    _checks.check_like("grad_x", grad_x, x, "x")
    _checks.check_like("grad_y", grad_y, x, "x")
    rows = x.shape[0]
    for name, value in (("energy_x", energy_x), ("energy_y", energy_y)):
        if not isinstance(value, torch.Tensor) or value.dim() > 1 or value.numel() != rows:
            raise ValueError(f"{name} must be a tensor with one energy per sample ({rows}), got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
        if value.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {value.device}")
    _checks.check_schedule_value("step_size", step_size, x, low=0, low_open=True)
    if uniform is None:
        uniform = random_uniforms((rows,), generator, x.device, torch.float64)
    elif uniform.numel() != rows or uniform.device != x.device:
        raise ValueError(f"uniform must hold one value per sample ({rows}) on the device of x, got "
                         f"{tuple(uniform.shape)} on {uniform.device}")
    backend = _backend.resolve_impl(impl, x.device)
    if backend == "reference":
        new_x, new_grad, new_energy, accepted = reference.mala_accept(x, y, grad_x, grad_y, energy_x, energy_y,
                                                                      step_size, uniform)
        if in_place:
            x.copy_(new_x), grad_x.copy_(new_grad), energy_x.copy_(new_energy)
            new_x, new_grad, new_energy = x, grad_x, energy_x
        return MalaResult(new_x, new_grad, new_energy, accepted, accepted.float().mean())
    steps = step_size if isinstance(step_size, torch.Tensor) else torch.full((1,), float(step_size), device=x.device)
    if in_place:
        x_out, grad_out, energy_out = x, grad_x, energy_x
    else:
        x_out, grad_out, energy_out = torch.empty_like(x), torch.empty_like(grad_x), torch.empty_like(energy_x)
    accepted = torch.empty(rows, dtype=torch.bool, device=x.device)
    mala_op.run(backend, x, y, grad_x, grad_y, energy_x, energy_y, steps.float().reshape(-1), uniform.reshape(-1),
                x_out, grad_out, energy_out, accepted)
    return MalaResult(x_out, grad_out, energy_out, accepted, accepted.float().mean())
