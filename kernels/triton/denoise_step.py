"""The fused denoise step in Triton: the formula of kernels/common/denoise_step.h.

Each program handles BLOCK_GROUPS groups of four consecutive elements, so that one Philox call
serves four elements exactly as on the other backends.
"""

import triton
import triton.language as tl

from .common import clamp_keep_nan, coef, default_block_groups, group_indices, philox_key_words
from .common import group_variants as gpu_variants  # noqa: F401 (for triton_gpu_compile)
from .philox import PHILOX_KEY_WORDS, philox_normal4

NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2


@triton.jit(do_not_specialize=PHILOX_KEY_WORDS)
def denoise_step_kernel(
    sample_ptr, model_ptr, model_cond_ptr, derivative_ptr, noise_ptr, out_ptr, pred_original_ptr, row_coefs_ptr,
    g, ax, am, az, o0, ox, om, oz, od,
    clip_lo, clip_hi, seed_lo, seed_hi, base_lo, base_hi, numel, row_size,
    HAS_COND: tl.constexpr, HAS_DERIVATIVE: tl.constexpr, NOISE: tl.constexpr, ROW_COEFS: tl.constexpr,
    CLIP: tl.constexpr, WRITE_PRED_ORIGINAL: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    group, idx = group_indices(BLOCK_GROUPS)
    mask = idx < numel
    row = idx // row_size

    x = tl.load(sample_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(model_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_COND:
        m_cond = tl.load(model_cond_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        m = m + coef(row_coefs_ptr, row, mask, g, 0, 9, ROW_COEFS) * (m_cond - m)
    if NOISE == 2:
        z = philox_normal4(seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), base_lo.to(tl.uint32),
                           base_hi.to(tl.uint32), group)
    elif NOISE == 1:
        z = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        z = tl.zeros_like(x)

    c_ax = coef(row_coefs_ptr, row, mask, ax, 1, 9, ROW_COEFS)
    c_am = coef(row_coefs_ptr, row, mask, am, 2, 9, ROW_COEFS)
    c_az = coef(row_coefs_ptr, row, mask, az, 3, 9, ROW_COEFS)
    x0 = c_ax * x + c_am * m + c_az * z
    if CLIP:
        x0 = clamp_keep_nan(x0, clip_lo, clip_hi)
    c_o0 = coef(row_coefs_ptr, row, mask, o0, 4, 9, ROW_COEFS)
    c_ox = coef(row_coefs_ptr, row, mask, ox, 5, 9, ROW_COEFS)
    c_om = coef(row_coefs_ptr, row, mask, om, 6, 9, ROW_COEFS)
    c_oz = coef(row_coefs_ptr, row, mask, oz, 7, 9, ROW_COEFS)
    out = c_o0 * x0 + c_ox * x + c_om * m + c_oz * z
    if HAS_DERIVATIVE:
        d = tl.load(derivative_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        out += coef(row_coefs_ptr, row, mask, od, 8, 9, ROW_COEFS) * d
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_PRED_ORIGINAL:
        tl.store(pred_original_ptr + idx, x0.to(pred_original_ptr.dtype.element_ty), mask=mask)


def launch_denoise_step(sample, model_output, model_output_cond, derivative, noise, row_coefs, coefs, clip, clip_lo,
                        clip_hi, philox_noise, seed, offset, out, pred_original, block_groups=None, wrap=None):
    """Runs the kernel on contiguous tensors of one shape and dtype; out and pred_original are written.
    wrap: torch.library.wrap_triton inside a triton_op, so that torch.compile sees the kernel."""
    numel = sample.numel()
    if numel == 0:
        return
    if block_groups is None:
        block_groups = default_block_groups(sample.device, numel)
    noise_kind = NOISE_TENSOR if noise is not None else (NOISE_PHILOX if philox_noise else NOISE_NONE)
    row_size = numel // row_coefs.shape[0] if row_coefs is not None else numel
    grid = (triton.cdiv(triton.cdiv(numel, 4), block_groups),)
    kernel = denoise_step_kernel if wrap is None else wrap(denoise_step_kernel)
    kernel[grid](
        sample, model_output, model_output_cond if model_output_cond is not None else sample,
        derivative if derivative is not None else sample, noise if noise is not None else sample,
        out, pred_original if pred_original is not None else out,
        row_coefs if row_coefs is not None else sample,
        *[float(c) for c in coefs],
        float(clip_lo), float(clip_hi), *philox_key_words(seed, offset), numel, row_size,
        HAS_COND=model_output_cond is not None, HAS_DERIVATIVE=derivative is not None, NOISE=noise_kind,
        ROW_COEFS=row_coefs is not None, CLIP=bool(clip), WRITE_PRED_ORIGINAL=pred_original is not None,
        BLOCK_GROUPS=block_groups,
    )
