"""torch.ops.genfast.rotary and rotary_ (native, from _C), their Triton forms (custom_ops with
explicit fakes, on every device), and the autograd of the functional forms: the turn is orthogonal,
so its backward is the inverse turn of the incoming gradient, by the same operator."""

import torch

from .. import _backend

Tensor = torch.Tensor


def rotary_input(x: Tensor) -> Tensor:
    """x with contiguous features, as the kernels read it (csrc/rotary_args.h's rotary_input)."""
    return x if x.stride(3) == 1 else x.contiguous()


def _tables(cos: Tensor, sin: Tensor):
    """cos and sin with contiguous features and one row stride."""
    if cos.stride(1) != 1 or sin.stride(1) != 1 or sin.stride(0) != cos.stride(0):
        return cos.contiguous(), sin.contiguous()
    return cos, sin


def _fake(x, cos, sin, positions, interleaved, inverse):
    return torch.empty_like(rotary_input(x))


def _inplace_fake(x, cos, sin, positions, interleaved, inverse):
    return None


def _setup_context(ctx, inputs, output):
    x, cos, sin, positions, interleaved, inverse = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.options = (interleaved, inverse)


def _make_backward(forward_op):
    def backward(ctx, grad_out):
        cos, sin, positions = ctx.saved_tensors
        interleaved, inverse = ctx.options
        return forward_op(grad_out, cos, sin, positions, interleaved, not inverse), None, None, None, None, None

    return backward


@torch.library.custom_op("genfast::rotary_triton", mutates_args=())
def rotary_triton(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool,
                  inverse: bool) -> Tensor:
    from ..kernels.rotary import launch_rotary

    x = rotary_input(x)
    out = torch.empty_like(x)
    launch_rotary(x, out, *_tables(cos, sin), positions, interleaved, inverse)
    return out


@torch.library.custom_op("genfast::rotary_triton_", mutates_args=("x",))
def rotary_triton_(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, inverse: bool) -> None:
    from ..kernels.rotary import launch_rotary

    turned = rotary_input(x)
    launch_rotary(turned, turned, *_tables(cos, sin), positions, interleaved, inverse)
    if turned is not x:
        x.copy_(turned)


rotary_triton.register_fake(_fake)
rotary_triton_.register_fake(_inplace_fake)
torch.library.register_autograd("genfast::rotary_triton", _make_backward(rotary_triton), setup_context=_setup_context)
if _backend.native_module() is not None:
    torch.library.register_fake("genfast::rotary")(_fake)
    torch.library.register_fake("genfast::rotary_")(_inplace_fake)
    torch.library.register_autograd("genfast::rotary", _make_backward(torch.ops.genfast.rotary.default),
                                    setup_context=_setup_context)


def operator(impl: str, inplace: bool):
    """The operator of a fused backend: functional (differentiable) or in place."""
    if impl == "native":
        return torch.ops.genfast.rotary_.default if inplace else torch.ops.genfast.rotary.default
    if impl == "triton":
        return torch.ops.genfast.rotary_triton_.default if inplace else torch.ops.genfast.rotary_triton.default
    raise ValueError(f"rotary has no operator for impl={impl!r}")
