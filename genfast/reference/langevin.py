"""The definition of genfast's Langevin-type updates, in plain PyTorch (float64).

Each function returns (result, mean): the update with its noise, and without (score_sde's
x_mean). Schedule values are floats or tensors with one value per sample; `noise` is a standard
normal tensor of x's shape, or None for a noiseless update.
"""

import torch

from ._schedule import per_sample as _per_sample


def _finish(out, mean, clamp, like):
    if clamp is not None:
        out, mean = out.clamp(*clamp), mean.clamp(*clamp)
    return out.to(like.dtype), mean.to(like.dtype)


def clip_gradient(grad, grad_clip=None, grad_norm_clip=None):
    """Elementwise clip to [-grad_clip, grad_clip], or per-sample rescaling to an L2 norm of at most
    grad_norm_clip (the norm over all but the first dimension)."""
    g = grad.double()
    if grad_clip is not None:
        g = g.clamp(-grad_clip, grad_clip)
    if grad_norm_clip is not None:
        norms = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) if g.dim() > 0 else g.abs()
        scale = (grad_norm_clip / norms).clamp(max=1.0)
        g = g * scale.reshape((-1,) + (1,) * (g.dim() - 1))
    return g


def langevin_step(x, grad, step_size, noise=None, *, noise_std=None, grad_clip=None, grad_norm_clip=None,
                  clamp=None):
    """x + step_size * g + noise_std * z, noise_std = sqrt(2 * step_size) unless given."""
    xd = x.double()
    g = clip_gradient(grad, grad_clip, grad_norm_clip)
    eps = _per_sample(step_size, xd)
    std = (2 * eps).sqrt() if noise_std is None else _per_sample(noise_std, xd)
    mean = xd + eps * g
    out = mean + std * noise.double() if noise is not None else mean
    return _finish(out, mean, clamp, x)


def ve_sde_step(score, x, sigma, sigma_next, noise=None, *, clamp=None):
    """The reverse VE SDE discretized as score_sde's ReverseDiffusionPredictor does:
    x + (sigma^2 - sigma_next^2) * score + sqrt(sigma^2 - sigma_next^2) * z."""
    xd = x.double()
    s, s_next = _per_sample(sigma, xd), _per_sample(sigma_next, xd)
    g2 = s**2 - s_next**2
    mean = xd + g2 * score.double()
    out = mean + g2.sqrt() * noise.double() if noise is not None else mean
    return _finish(out, mean, clamp, x)


def vp_sde_step(score, x, beta, dt, noise=None, *, clamp=None):
    """score_sde's EulerMaruyamaPredictor for the VP SDE, one step of size dt back in time:
    drift f = -beta x / 2, diffusion g = sqrt(beta), x_mean = x - (f - g^2 score) * dt."""
    xd = x.double()
    b, h = _per_sample(beta, xd), _per_sample(dt, xd)
    drift = -0.5 * b * xd
    diffusion = b.sqrt()
    reverse_drift = drift - diffusion**2 * score.double()
    mean = xd - reverse_drift * h
    out = mean + diffusion * h.sqrt() * noise.double() if noise is not None else mean
    return _finish(out, mean, clamp, x)


def langevin_corrector_step(score, x, snr, noise, *, alpha=1.0, per_sample_norms=False):
    """score_sde's LangevinCorrector, one step: eps = 2 alpha (snr ||z|| / ||score||)^2 per sample,
    with the norms' batch means unless per_sample_norms; x + eps * score + sqrt(2 eps) * z."""
    xd, s, z = x.double(), score.double(), noise.double()
    rows = x.shape[0]
    grad_norm = torch.linalg.vector_norm(s.reshape(rows, -1), dim=-1)
    noise_norm = torch.linalg.vector_norm(z.reshape(rows, -1), dim=-1)
    if not per_sample_norms:
        grad_norm, noise_norm = grad_norm.mean(), noise_norm.mean()
    eps = (snr * noise_norm / grad_norm) ** 2 * 2 * _per_sample(alpha, xd).reshape(-1)
    eps = eps.reshape((-1,) + (1,) * (x.dim() - 1))
    mean = xd + eps * s
    return _finish(mean + (2 * eps).sqrt() * z, mean, None, x)


def mala_accept(x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform):
    """The Metropolis-adjusted Langevin accept/reject of proposals y = x + eps g_x + sqrt(2 eps) z:
    accept where log u < E(x) - E(y) + log q(x | y) - log q(y | x), with
    log q(b | a) = -||b - a - eps g_a||^2 / (4 eps) (g = grad log p). Returns (x, grad, energy,
    accepted) after the step."""
    rows = x.shape[0]
    xd, yd, gx, gy = x.double(), y.double(), grad_x.double(), grad_y.double()
    eps = _per_sample(step_size, xd)
    forward = ((yd - xd - eps * gx) ** 2).reshape(rows, -1).sum(1)
    backward = ((xd - yd - eps * gy) ** 2).reshape(rows, -1).sum(1)
    log_alpha = energy_x.double() - energy_y.double() + (forward - backward) / (4 * eps.reshape(-1))
    accepted = uniform.double().log() < log_alpha
    keep = accepted.reshape((-1,) + (1,) * (x.dim() - 1))
    return (torch.where(keep, y, x), torch.where(keep, grad_y, grad_x), torch.where(accepted, energy_y, energy_x),
            accepted)
