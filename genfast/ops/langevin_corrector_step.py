"""torch.ops.genfast.langevin_corrector_step (native, from _C), and its Triton form: the noise-norm
kernel (an operator of its own) composed with the Triton Langevin step."""

import torch

from .. import _backend
from . import langevin_step as langevin_op

def _native_fake(x, score, noise, alpha, snr, per_sample_norms, philox_noise, generator, seed, offset, out, mean_out):
    return None


if _backend.native_module() is not None:
    torch.library.register_fake("genfast::langevin_corrector_step")(_native_fake)


def _noise_norms(partial, row_size, seed, offset, wrap=None):
    from ..kernels.noise_norms import launch_noise_norms

    launch_noise_norms(partial, row_size, seed, offset, wrap=wrap)


@torch.library.triton_op("genfast::noise_norms_triton", mutates_args=("partial",))
def noise_norms_triton(partial: torch.Tensor, row_size: int, seed: int, offset: int) -> None:
    _noise_norms(partial, row_size, seed, offset, wrap=torch.library.wrap_triton)


@torch.library.custom_op("genfast::noise_norms_triton_interpreted", mutates_args=("partial",))
def noise_norms_triton_interpreted(partial: torch.Tensor, row_size: int, seed: int, offset: int) -> None:
    _noise_norms(partial, row_size, seed, offset)


noise_norms_triton_interpreted.register_fake(lambda partial, row_size, seed, offset: None)


def noise_squares_triton(x, seed, offset):
    """Per-sample sums of squares of the noise keyed by (seed, offset), as float64 (rows,)."""
    from ..kernels.noise_norms import CHUNK

    rows = x.shape[0]
    row_size = x.numel() // rows
    partial = torch.empty(rows, -(-row_size // CHUNK), dtype=torch.float32, device=x.device)
    op = torch.ops.genfast.noise_norms_triton_interpreted if x.device.type == "cpu" else \
        torch.ops.genfast.noise_norms_triton
    op(partial, row_size, seed, offset)
    return partial.double().sum(1)


def corrector_row_coefs(score, noise_squares, alpha, snr, per_sample_norms):
    """The Langevin step's coefficients per sample; the same maths as csrc/langevin_corrector_args.h."""
    rows = score.shape[0]
    grad_norm = torch.linalg.vector_norm(score.reshape(rows, -1).float(), dim=1).double()
    noise_norm = noise_squares.double().sqrt()
    if not per_sample_norms:
        grad_norm, noise_norm = grad_norm.mean().expand(rows), noise_norm.mean().expand(rows)
    step = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha.double().reshape(-1).expand(rows)
    ones = torch.ones_like(step)
    return torch.stack([ones, step, (2 * step).sqrt(), ones], dim=1).float().contiguous()


def run(impl, x, score, noise, alpha, snr, per_sample_norms, philox_noise, generator, seed, offset, out, mean_out):
    if impl == "native":
        torch.ops.genfast.langevin_corrector_step(x, score, noise, alpha, snr, per_sample_norms, philox_noise,
                                                  generator, seed, offset, out, mean_out)
        return
    if impl != "triton":
        raise ValueError(f"langevin_corrector_step has no operator for impl={impl!r}")
    if generator is not None:
        raise ValueError("the Triton Langevin corrector is keyed by seed and offset, not by a generator")
    if x.numel() == 0:
        return
    if noise is not None:
        squares = torch.linalg.vector_norm(noise.reshape(noise.shape[0], -1).float(), dim=1).double() ** 2
    else:
        squares = noise_squares_triton(x, seed, offset)
    row_coefs = corrector_row_coefs(score, squares, alpha, snr, per_sample_norms)
    inf = float("inf")
    langevin_op.run("triton", x, score, noise, row_coefs, [0.0] * 4, inf, -inf, inf, noise is None, None, seed, offset,
                    out, mean_out)
