"""The fused DDPM step against its peers, with the noise drawn in-kernel and given as a tensor.

Peers: the step in eager PyTorch (float32 ops, torch.randn noise), torch.compile of it, and
diffusers' DDPMScheduler.step. Figures: median time, GB/s (bytes the step must move: sample and
model output read, result written, and the noise read when it is given), the fraction of the
memory bandwidth a large copy reaches just before each size's measurements (above 100% when
the data stay in cache),
and each peer's time over genfast's.
"""

import torch

import genfast
from .elementwise import default_dtypes, fused_impls, run_groups

ALPHA_T, ALPHA_PREV = 0.5, 0.52  # DDPM's linear schedule near t = 500 of 1000
SIZES_CPU = [1 << 16, 1 << 20, 1 << 24, 1 << 26]
SIZES_GPU = [1 << 16, 1 << 20, 1 << 24, 1 << 26]
QUICK_SIZES = [1 << 20, 1 << 24]


def eager_ddpm_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise=None):
    """The step as diffusers writes it, in the input dtype, one PyTorch op at a time."""
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    prev = (alpha_prod_t_prev**0.5 * current_beta_t / beta_prod_t) * pred_original + (
        current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
    ) * sample
    if noise is None:
        noise = torch.randn_like(sample)
    variance = max((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, 1e-20)
    return prev + variance**0.5 * noise


def _diffusers_step():
    try:
        from diffusers import DDPMScheduler
    except ImportError:
        return None
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timestep = 500

    def step(model_output, sample, generator):
        return scheduler.step(model_output, timestep, sample, generator=generator).prev_sample

    return step


def run(device: str, quick: bool = False, progress=None, dtypes=None, sizes=None):
    """Returns result rows (dicts); progress(message) is called before each measurement.
    sizes: element counts, multiples of 4096 (default: 64K to 64M)."""
    if sizes is None:
        sizes = QUICK_SIZES if quick else (SIZES_GPU if device == "cuda" else SIZES_CPU)
    fused = fused_impls(device)
    diffusers_step = _diffusers_step()
    compiled_eager = torch.compile(eager_ddpm_step, dynamic=False)

    def make_candidates(numel, dtype):
        shape = (numel // 4096, 4, 32, 32)  # latents of 4 x 32 x 32, as in a small latent-diffusion model
        sample = torch.randn(shape, device=device, dtype=dtype)
        model_output = torch.randn(shape, device=device, dtype=dtype)
        noise = torch.randn(shape, device=device, dtype=dtype)
        out = torch.empty_like(sample)
        generator = genfast.PhiloxGenerator(0)
        torch_generator = torch.Generator(device=device).manual_seed(0)
        in_kernel, given = [], []
        for impl in fused:
            in_kernel.append((f"genfast {impl}", lambda impl=impl: genfast.ddpm_step(
                model_output, sample, ALPHA_T, ALPHA_PREV, generator=generator, out=out, impl=impl)))
            given.append((f"genfast {impl}", lambda impl=impl: genfast.ddpm_step(
                model_output, sample, ALPHA_T, ALPHA_PREV, noise=noise, out=out, impl=impl)))
        in_kernel += [
            ("eager torch", lambda: eager_ddpm_step(model_output, sample, ALPHA_T, ALPHA_PREV)),
            ("torch.compile", lambda: compiled_eager(model_output, sample, ALPHA_T, ALPHA_PREV)),
        ]
        if diffusers_step is not None:
            in_kernel.append(("diffusers step", lambda: diffusers_step(model_output, sample, torch_generator)))
        given += [
            ("eager torch", lambda: eager_ddpm_step(model_output, sample, ALPHA_T, ALPHA_PREV, noise)),
            ("torch.compile", lambda: compiled_eager(model_output, sample, ALPHA_T, ALPHA_PREV, noise)),
        ]
        element = sample.element_size()
        return {"in-kernel noise": (3 * numel * element, in_kernel), "given noise": (4 * numel * element, given)}

    return run_groups("denoise_step (DDPM)", device, sizes, dtypes or default_dtypes(device), quick, progress,
                      make_candidates)
