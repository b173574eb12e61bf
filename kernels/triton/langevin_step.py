"""The fused Langevin step in Triton: the formula of kernels/common/langevin_step.h."""

import triton
import triton.language as tl

from .common import clamp_keep_nan, coef, default_block_groups, group_indices, philox_key_words
from .common import group_variants as gpu_variants  # noqa: F401 (for triton_gpu_compile)
from .philox import PHILOX_KEY_WORDS, philox_normal4

NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2


@triton.jit(do_not_specialize=PHILOX_KEY_WORDS)
def langevin_step_kernel(
    x_ptr, grad_ptr, noise_ptr, out_ptr, mean_ptr, row_coefs_ptr,
    x_scale, step_size, noise_std, grad_scale, grad_clip, clamp_lo, clamp_hi,
    seed_lo, seed_hi, base_lo, base_hi, numel, row_size,
    NOISE: tl.constexpr, ROW_COEFS: tl.constexpr, GRAD_CLIP: tl.constexpr, CLAMP: tl.constexpr,
    WRITE_MEAN: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    group, idx = group_indices(BLOCK_GROUPS)
    mask = idx < numel
    row = idx // row_size

    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if GRAD_CLIP:
        g = clamp_keep_nan(g, -grad_clip, grad_clip)
    g = g * coef(row_coefs_ptr, row, mask, grad_scale, 3, 4, ROW_COEFS)
    x_coef = coef(row_coefs_ptr, row, mask, x_scale, 0, 4, ROW_COEFS)
    mean = x_coef * x + coef(row_coefs_ptr, row, mask, step_size, 1, 4, ROW_COEFS) * g
    if NOISE == 2:
        z = philox_normal4(seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), base_lo.to(tl.uint32),
                           base_hi.to(tl.uint32), group)
        out = mean + coef(row_coefs_ptr, row, mask, noise_std, 2, 4, ROW_COEFS) * z
    elif NOISE == 1:
        z = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        out = mean + coef(row_coefs_ptr, row, mask, noise_std, 2, 4, ROW_COEFS) * z
    else:
        out = mean
    if CLAMP:
        out = clamp_keep_nan(out, clamp_lo, clamp_hi)
        mean = clamp_keep_nan(mean, clamp_lo, clamp_hi)
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_MEAN:
        tl.store(mean_ptr + idx, mean.to(mean_ptr.dtype.element_ty), mask=mask)


def launch_langevin_step(x, grad, noise, row_coefs, coefs, grad_clip, clamp_lo, clamp_hi, philox_noise, seed, offset,
                         out, mean_out, block_groups=None, wrap=None):
    """Runs the kernel on contiguous tensors of one shape and dtype; out and mean_out are written.
    wrap: torch.library.wrap_triton inside a triton_op."""
    numel = x.numel()
    if numel == 0:
        return
    if block_groups is None:
        block_groups = default_block_groups(x.device, numel)
    noise_kind = NOISE_TENSOR if noise is not None else (NOISE_PHILOX if philox_noise else NOISE_NONE)
    row_size = numel // row_coefs.shape[0] if row_coefs is not None else numel
    grid = (triton.cdiv(triton.cdiv(numel, 4), block_groups),)
    kernel = langevin_step_kernel if wrap is None else wrap(langevin_step_kernel)
    inf = float("inf")
    kernel[grid](
        x, grad, noise if noise is not None else x, out, mean_out if mean_out is not None else out,
        row_coefs if row_coefs is not None else x,
        *[float(c) for c in coefs], float(grad_clip), float(clamp_lo), float(clamp_hi),
        *philox_key_words(seed, offset), numel, row_size,
        NOISE=noise_kind, ROW_COEFS=row_coefs is not None, GRAD_CLIP=grad_clip != inf,
        CLAMP=clamp_lo != -inf or clamp_hi != inf, WRITE_MEAN=mean_out is not None, BLOCK_GROUPS=block_groups,
    )
