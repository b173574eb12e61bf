"""`genfast check` cases of the flow ops: forward and gradients of each fused backend against the
float64 reference, by the error-ratio rule."""

import torch

from .. import flows
from ..reference import flows as reference


def _coupling_case(scale_fn, order, inverse, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 5, generator=g)
    mask = torch.arange(4) < 2
    params = torch.randn(6, 4, 5, 5, generator=g)
    inputs = [t.to(device=device, dtype=dtype) for t in (x, params[:, :2], params[:, 2:])]
    options = dict(scale_fn=scale_fn, order=order, inverse=inverse)

    def run(impl, cast=None):
        leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in inputs]
        if impl == "reference":
            y, logdet = reference.affine_coupling(*leaves, mask.to(device), scale_fn, flows.scale_param(scale_fn),
                                                  order == "glow", inverse)
        else:
            y, logdet = flows.affine_coupling(*leaves, mask.to(device), impl=impl, **options)
        weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64, device=device).reshape(y.shape)
        grads = torch.autograd.grad((y.double() * weights).sum() + logdet.double().sum(), leaves)
        return [y, logdet, *grads]

    return run


def _actnorm_case(order, inverse, dtype, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 6, 6, generator=g).to(device=device, dtype=dtype)
    log_scale, bias = (torch.randn(3, generator=g).to(device) for _ in range(2))

    def run(impl, cast=None):
        leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in (x, log_scale, bias)]
        if impl == "reference":
            y, logdet = reference.actnorm(*leaves, order == "glow", inverse)
        else:
            y, logdet = flows.actnorm(*leaves, order=order, inverse=inverse, impl=impl)
        weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64, device=device).reshape(y.shape)
        return [y, logdet, *torch.autograd.grad((y.double() * weights).sum() + logdet.double().sum(), leaves)]

    return run


OUTPUTS = ("y", "logdet")


def cases(device, dtypes):
    """(name, dtype, run, output names) for each case."""
    for dtype in dtypes:
        for scale_fn in reference.SCALE_FNS:
            for order in ("affine", "glow"):
                for inverse in (False, True):
                    name = f"coupling {scale_fn} {order}{' inverse' if inverse else ''}"
                    yield name, dtype, _coupling_case(scale_fn, order, inverse, dtype, device), OUTPUTS
        for order in ("affine", "glow"):
            for inverse in (False, True):
                yield (f"actnorm {order}{' inverse' if inverse else ''}", dtype,
                       _actnorm_case(order, inverse, dtype, device), OUTPUTS)
