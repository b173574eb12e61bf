"""The fused DDPM step against its peers, with the noise drawn in-kernel and given as a tensor.

Peers: the step in eager PyTorch (float32 ops, torch.randn noise), torch.compile of it, and
diffusers' DDPMScheduler.step. Figures: median time, GB/s (bytes the step must move: sample and
model output read, result written, and the noise read when it is given), the fraction of the
memory bandwidth a large copy reaches just before each size's measurements (above 100% when
the data stay in cache),
and each peer's time over genfast's.
"""

import math

import torch

import genfast
from .. import _backend
from .timing import copy_bandwidth_gbs, time_ms

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
    if dtypes is None:
        dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    fused = [impl for impl in ("native", "triton") if impl in _backend.available_impls(device)]
    if device == "cpu":
        fused = [impl for impl in fused if impl != "triton"]  # the interpreter is no benchmark
    diffusers_step = _diffusers_step()
    compiled_eager = torch.compile(eager_ddpm_step, dynamic=False)
    rows = []
    say = progress or (lambda message: None)
    for numel in sizes:
        # Measured beside each group: a shared machine's memory bandwidth drifts over minutes.
        say(f"denoise_step: copy bandwidth before {numel} elements")
        copy_gbs, copy_measured = copy_bandwidth_gbs(device, quick)
        for dtype in dtypes:
            shape = (numel // 4096, 4, 32, 32)  # latents of 4 x 32 x 32, as in a small latent-diffusion model
            sample = torch.randn(shape, device=device, dtype=dtype)
            model_output = torch.randn(shape, device=device, dtype=dtype)
            noise = torch.randn(shape, device=device, dtype=dtype)
            out = torch.empty_like(sample)
            element_bytes = sample.element_size()
            generator = genfast.PhiloxGenerator(0)
            torch_generator = torch.Generator(device=device).manual_seed(0)
            candidates = {"in-kernel noise": [], "given noise": []}
            for impl in fused:
                candidates["in-kernel noise"].append((f"genfast {impl}", lambda impl=impl: genfast.ddpm_step(
                    model_output, sample, ALPHA_T, ALPHA_PREV, generator=generator, out=out, impl=impl)))
                candidates["given noise"].append((f"genfast {impl}", lambda impl=impl: genfast.ddpm_step(
                    model_output, sample, ALPHA_T, ALPHA_PREV, noise=noise, out=out, impl=impl)))
            candidates["in-kernel noise"] += [
                ("eager torch", lambda: eager_ddpm_step(model_output, sample, ALPHA_T, ALPHA_PREV)),
                ("torch.compile", lambda: compiled_eager(model_output, sample, ALPHA_T, ALPHA_PREV)),
            ]
            if diffusers_step is not None:
                candidates["in-kernel noise"].append(
                    ("diffusers step", lambda: diffusers_step(model_output, sample, torch_generator)))
            candidates["given noise"] += [
                ("eager torch", lambda: eager_ddpm_step(model_output, sample, ALPHA_T, ALPHA_PREV, noise)),
                ("torch.compile", lambda: compiled_eager(model_output, sample, ALPHA_T, ALPHA_PREV, noise)),
            ]
            for variant, entries in candidates.items():
                tensors_moved = 3 if variant == "in-kernel noise" else 4
                bytes_moved = tensors_moved * numel * element_bytes
                group = []
                for name, fn in entries:
                    say(f"denoise_step: {name}, {variant}, {numel} x {str(dtype).replace('torch.', '')}")
                    timing = time_ms(fn, device, quick)
                    gbs = bytes_moved / (timing["median_ms"] * 1e-3) / 1e9
                    group.append(dict(op="denoise_step (DDPM)", variant=variant, impl=name, device=device,
                                      dtype=str(dtype).replace("torch.", ""), numel=numel, **timing, gb_per_s=gbs,
                                      copy_gb_per_s=copy_gbs, copy_gb_per_s_measured=copy_measured,
                                      fraction_of_copy=gbs / copy_gbs))
                best_genfast = min((r["median_ms"] for r in group if r["impl"].startswith("genfast")),
                                   default=math.nan)
                for row in group:
                    row["time_over_genfast"] = row["median_ms"] / best_genfast
                rows += group
    return rows
