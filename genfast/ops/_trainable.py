"""The registration every trainable op shares: fakes of the forward and backward operators, the
autograd that links each forward to its backward kernel, on the native and the Triton forms."""

import torch

from .. import _backend


def register(name: str, fake, backward_fake, setup_context, make_backward, triton_forward, triton_backward):
    """genfast::<name> and <name>_backward (native, when _C is built) and their Triton custom_ops."""
    triton_forward.register_fake(fake)
    triton_backward.register_fake(backward_fake)
    torch.library.register_autograd(f"genfast::{name}_triton", make_backward(triton_backward),
                                    setup_context=setup_context)
    if _backend.native_module() is not None:
        torch.library.register_fake(f"genfast::{name}")(fake)
        torch.library.register_fake(f"genfast::{name}_backward")(backward_fake)
        torch.library.register_autograd(f"genfast::{name}", make_backward(getattr(torch.ops.genfast, f"{name}_backward")),
                                        setup_context=setup_context)


def operator(name: str, impl: str):
    """The forward operator of a fused backend."""
    if impl == "native":
        return getattr(torch.ops.genfast, name)
    if impl == "triton":
        return getattr(torch.ops.genfast, f"{name}_triton")
    raise ValueError(f"{name} has no operator for impl={impl!r}")
