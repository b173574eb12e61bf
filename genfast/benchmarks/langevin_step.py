"""The fused Langevin step against its peers, with the noise drawn in-kernel and given as a tensor.

Peers: the step as score_sde writes it (x_mean = x + eps * grad; x = x_mean + sqrt(2 eps) * z,
eager, torch.randn noise), torch.compile of it, the EBM-style step with gradient clipping and
clamping to the image range that IGEBM/JEM-like code writes, score_sde's Langevin corrector with
its norms, and MALA's accept/reject written with torch.where. Figures as in denoise_step.
"""

import torch

import genfast
from .elementwise import default_dtypes, fused_impls, run_groups

STEP, NOISE_STD, GRAD_CLIP, CLAMP = 0.01, 0.005, 0.03, (0.0, 1.0)
SIZES = [1 << 16, 1 << 20, 1 << 24, 1 << 26]
QUICK_SIZES = [1 << 20, 1 << 24]


def score_sde_step(x, grad, step_size, noise=None):
    noise = torch.randn_like(x) if noise is None else noise
    x_mean = x + step_size * grad
    return x_mean + (2 * step_size) ** 0.5 * noise


def ebm_step(x, grad, step_size, noise_std, grad_clip, lo, hi, noise=None):
    noise = torch.randn_like(x) if noise is None else noise
    return (x + step_size * grad.clamp(-grad_clip, grad_clip) + noise_std * noise).clamp(lo, hi)


def score_sde_corrector(score, x, snr, alpha=1.0):
    """score_sde's LangevinCorrector.update_fn, one step, as it is written there."""
    noise = torch.randn_like(x)
    grad_norm = torch.norm(score.reshape(score.shape[0], -1), dim=-1).mean()
    noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
    step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
    x_mean = x + step_size * score
    return x_mean + torch.sqrt(step_size * 2) * noise


def eager_mala_accept(x, y, grad_x, grad_y, energy_x, energy_y, step_size):
    """MALA's accept/reject as it is usually written: both proposal densities, then torch.where."""
    rows = x.shape[0]
    log_q_forward = -((y - x - step_size * grad_x) ** 2).reshape(rows, -1).sum(1) / (4 * step_size)
    log_q_backward = -((x - y - step_size * grad_y) ** 2).reshape(rows, -1).sum(1) / (4 * step_size)
    log_alpha = energy_x - energy_y + log_q_backward - log_q_forward
    accepted = torch.rand_like(log_alpha).log() < log_alpha
    keep = accepted.reshape((-1,) + (1,) * (x.dim() - 1))
    return torch.where(keep, y, x), torch.where(keep, grad_y, grad_x), torch.where(accepted, energy_y, energy_x)


def run(device: str, quick: bool = False, progress=None, dtypes=None, sizes=None):
    """Returns result rows (dicts); progress(message) is called before each measurement."""
    if sizes is None:
        sizes = QUICK_SIZES if quick else SIZES
    fused = fused_impls(device)
    compiled_sde = torch.compile(score_sde_step, dynamic=False)
    compiled_ebm = torch.compile(ebm_step, dynamic=False)
    compiled_corrector = torch.compile(score_sde_corrector, dynamic=False)
    compiled_mala = torch.compile(eager_mala_accept, dynamic=False)

    def make_candidates(numel, dtype):
        shape = (numel // 3072, 3, 32, 32)  # CIFAR-sized images
        x = torch.rand(shape, device=device, dtype=dtype)
        grad = torch.randn(shape, device=device, dtype=dtype)
        noise = torch.randn(shape, device=device, dtype=dtype)
        out = torch.empty_like(x)
        generator = genfast.PhiloxGenerator(0)
        groups = {}
        for variant, given in (("ULA, in-kernel noise", None), ("ULA, given noise", noise)):
            entries = [(f"genfast {impl}", lambda impl=impl, given=given: genfast.langevin_step(
                x, grad, STEP, noise=given, generator=generator, out=out, impl=impl)) for impl in fused]
            entries += [("eager (score_sde)", lambda given=given: score_sde_step(x, grad, STEP, given)),
                        ("torch.compile", lambda given=given: compiled_sde(x, grad, STEP, given))]
            groups[variant] = ((3 if given is None else 4) * numel * x.element_size(), entries)
        entries = [(f"genfast {impl}", lambda impl=impl: genfast.langevin_step(
            x, grad, STEP, noise_std=NOISE_STD, grad_clip=GRAD_CLIP, clamp=CLAMP, generator=generator, out=out,
            impl=impl)) for impl in fused]
        entries += [("eager (EBM style)", lambda: ebm_step(x, grad, STEP, NOISE_STD, GRAD_CLIP, *CLAMP)),
                    ("torch.compile", lambda: compiled_ebm(x, grad, STEP, NOISE_STD, GRAD_CLIP, *CLAMP))]
        groups["EBM clip+clamp, in-kernel noise"] = (3 * numel * x.element_size(), entries)
        # The corrector reads x once and the score twice (norms, then the update); GB/s counts the
        # three tensors any implementation must move.
        entries = [(f"genfast {impl}", lambda impl=impl: genfast.langevin_corrector_step(
            grad, x, 0.16, generator=generator, out=out, impl=impl)) for impl in fused]
        entries += [("eager (score_sde)", lambda: score_sde_corrector(grad, x, 0.16)),
                    ("torch.compile", lambda: compiled_corrector(grad, x, 0.16))]
        groups["score_sde corrector, in-kernel noise"] = (3 * numel * x.element_size(), entries)
        # MALA's accept/reject reads x, y and both gradients and writes the kept state: 6 tensors
        # counted. genfast runs in place, as samplers.mala does (only accepted rows are written);
        # the peers allocate new tensors, as such code is written.
        y = x + STEP * grad + (2 * STEP) ** 0.5 * noise
        energy_x = torch.randn(x.shape[0], device=device)
        energy_y = energy_x + 0.1 * torch.randn_like(energy_x)
        grad_y = -y
        state = (x.clone(), grad.clone(), energy_x.clone())
        entries = [(f"genfast {impl}", lambda impl=impl: genfast.mala_accept(
            state[0], y, state[1], grad_y, state[2], energy_y, STEP, generator=generator, in_place=True, impl=impl))
            for impl in fused]
        entries += [("eager torch", lambda: eager_mala_accept(x, y, grad, grad_y, energy_x, energy_y, STEP)),
                    ("torch.compile", lambda: compiled_mala(x, y, grad, grad_y, energy_x, energy_y, STEP))]
        groups["MALA accept/reject"] = (6 * numel * x.element_size(), entries)
        return groups

    return run_groups("langevin_step", device, sizes, dtypes or default_dtypes(device), quick, progress,
                      make_candidates)
