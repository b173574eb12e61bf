"""torch.ops.genfast.mala_accept (native, from _C) and torch.ops.genfast.mala_accept_triton.

The Triton form composes its two kernels with the per-sample decision in one custom_op with an
explicit fake (opaque to torch.compile, which calls it as one op)."""

import torch

from .. import _backend
from ._buffers import contiguous_inputs, copy_back, output_buffers

def _fake(x, y, grad_x, grad_y, energy_x, energy_y, step_size, uniform, x_out, grad_out, energy_out, accepted):
    return None


if _backend.native_module() is not None:
    torch.library.register_fake("genfast::mala_accept")(_fake)


def decide(partial, energy_x, energy_y, uniform):
    """(accepted, kept energies): the same maths as csrc/mala_args.h."""
    log_alpha = energy_x.double() - energy_y.double() - partial.double().sum(1) / 4
    accepted = uniform.double().reshape(-1).log() < log_alpha
    return accepted, torch.where(accepted.reshape(energy_x.shape), energy_y, energy_x)


@torch.library.custom_op("genfast::mala_accept_triton",
                         mutates_args=("x_out", "grad_out", "energy_out", "accepted"))
def mala_accept_triton(x: torch.Tensor, y: torch.Tensor, grad_x: torch.Tensor, grad_y: torch.Tensor,
                       energy_x: torch.Tensor, energy_y: torch.Tensor, step_size: torch.Tensor, uniform: torch.Tensor,
                       x_out: torch.Tensor, grad_out: torch.Tensor, energy_out: torch.Tensor,
                       accepted: torch.Tensor) -> None:
    from ..kernels.mala import CHUNK, launch_mala_select, launch_mala_sums

    rows = x.shape[0]
    if rows == 0:
        return
    xc, yc, gxc, gyc = contiguous_inputs(x, y, grad_x, grad_y)
    steps = step_size.float().contiguous()
    num_chunks = -(-(x.numel() // rows) // CHUNK)
    partial = torch.empty(rows, num_chunks, dtype=torch.float32, device=x.device)
    launch_mala_sums(xc, yc, gxc, gyc, steps, partial)
    keep, energies = decide(partial, energy_x, energy_y, uniform)
    accepted.copy_(keep)
    energy_out.copy_(energies)
    buffers = output_buffers(x_out, grad_out)
    launch_mala_select(keep.to(torch.uint8).contiguous(), xc, yc, gxc, gyc, *buffers)
    copy_back(buffers, (x_out, grad_out))


mala_accept_triton.register_fake(_fake)


def run(impl, *args):
    if impl == "native":
        torch.ops.genfast.mala_accept(*args)
    elif impl == "triton":
        torch.ops.genfast.mala_accept_triton(*args)
    else:
        raise ValueError(f"mala_accept has no operator for impl={impl!r}")
