"""`genfast check` cases of NADE's ops and MADE's masked linear layer: values and gradients of each
fused backend against the float64 reference by the error-ratio rule, and samples drawn from the
same uniforms."""

import torch

from .. import made, nade
from ..reference import nade as reference


def _nade_case(activation, ordering, dtype, device):
    g = torch.Generator().manual_seed(2)
    batch, dims, hidden = 12, 20, 16
    x = (torch.rand(batch, dims, generator=g) < 0.5).to(device=device, dtype=dtype)
    params = [(torch.randn(*shape, generator=g) * 0.5).to(device=device, dtype=dtype)
              for shape in ((hidden, dims), (hidden,), (dims, hidden), (dims,))]
    order = {"natural": None, "shared": torch.randperm(dims, generator=g),
             "per sample": torch.rand(batch, dims, generator=g).argsort(1)}[ordering]
    order = None if order is None else order.to(device)
    weights = torch.linspace(-1, 1, batch * dims, dtype=torch.float64, device=device).reshape(batch, dims)

    def run(impl, cast=None):
        leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in params]
        xs = x if cast is None else x.to(cast)
        if impl == "reference":
            logits = reference.conditionals(xs, *leaves, order, activation)
        else:
            logits = nade.nade_conditionals(xs, *leaves, order, activation=activation, impl=impl)
        return [logits, *torch.autograd.grad((logits.double() * weights).sum(), leaves)]

    return run


def _sample_case(activation, dtype, device):
    g = torch.Generator().manual_seed(3)
    batch, dims, hidden = 16, 24, 12
    params = [torch.randn(*shape, generator=g).to(device) for shape in ((hidden, dims), (hidden,), (dims, hidden),
                                                                        (dims,))]
    uniforms = torch.rand(batch, dims, generator=g).to(device)

    def run(impl, cast=None):
        if impl == "reference":
            ps = [t.to(cast or t.dtype) for t in params]
            return [reference.sample(*ps, uniforms.to(cast or uniforms.dtype), activation=activation).to(dtype)]
        return [nade.nade_sample(*params, batch, uniforms=uniforms, activation=activation, dtype=dtype, impl=impl)]

    return run


def _made_case(strict, dtype, device):
    g = torch.Generator().manual_seed(4)
    rows, fan_in, fan_out = 10, 30, 26
    inputs = [t.to(device=device, dtype=dtype) for t in (torch.randn(rows, fan_in, generator=g),
                                                         torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5,
                                                         torch.randn(fan_out, generator=g))]
    in_degrees = torch.randint(1, 8, (fan_in,), generator=g).to(device)
    out_degrees = torch.randint(1, 8, (fan_out,), generator=g).to(device)
    weights = torch.linspace(-1, 1, rows * fan_out, dtype=torch.float64, device=device).reshape(rows, fan_out)

    def run(impl, cast=None):
        leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in inputs]
        if impl == "reference":
            y = reference.made_linear(*leaves, in_degrees, out_degrees, strict)
        else:
            y = made.made_linear(*leaves, in_degrees, out_degrees, strict=strict, impl=impl)
        return [y, *torch.autograd.grad((y.double() * weights).sum(), leaves)]

    return run


def cases(device, dtypes):
    """(name, dtype, run, output names) for each case."""
    for dtype in dtypes:
        for activation in reference.ACTIVATIONS:
            for ordering in ("natural", "shared", "per sample"):
                yield f"nade {activation} {ordering}", dtype, _nade_case(activation, ordering, dtype, device), \
                    ("logits",)
            yield f"nade_sample {activation}", dtype, _sample_case(activation, dtype, device), ("samples",)
        for strict in (False, True):
            yield f"made_linear{' strict' if strict else ''}", dtype, _made_case(strict, dtype, device), ("y",)
