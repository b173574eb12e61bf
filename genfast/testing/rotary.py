"""`genfast check` cases of the rotary embedding: output and gradient of each fused backend against
the float64 reference, by the error-ratio rule; both plane layouts, a partial rotary dim, the inverse
turn, a transposed (transformers') layout and positions per sequence."""

import torch

from ..rotary import rotary

OUTPUTS = ("out",)


def _case(interleaved, rotary_dim, inverse, transposed, dtype, device):
    g = torch.Generator().manual_seed(0)
    batch, seqlen, heads, dim, positions = 3, 33, 4, 64, 80
    x = torch.randn(batch, heads, seqlen, dim, generator=g).to(device=device, dtype=dtype)
    x = x.transpose(1, 2) if transposed else x.transpose(1, 2).contiguous()
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    cos, sin = (t.to(device=device, dtype=dtype) for t in (angles.cos(), angles.sin()))
    offsets = torch.tensor([0, 11, 40], device=device)[:, None]
    rows = (torch.arange(seqlen, device=device) + offsets).to(torch.int32)

    def run(impl, cast=None):
        leaf = (x if cast is None else x.to(cast)).detach().requires_grad_()
        tables = [t if cast is None else t.to(cast) for t in (cos, sin)]
        out = rotary(leaf, *tables, rows, interleaved=interleaved, inverse=inverse, impl=impl)
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=device).reshape(out.shape)
        return [out, *torch.autograd.grad((out.double() * weights).sum(), leaf)]

    return run


def cases(device, dtypes):
    """(name, dtype, run, output names) for each case."""
    for dtype in dtypes:
        for interleaved, rotary_dim, inverse, transposed in ((False, 64, False, True), (True, 64, False, False),
                                                             (False, 24, True, False), (True, 40, True, True)):
            name = (f"{'interleaved' if interleaved else 'neox'} dim {rotary_dim}{' inverse' if inverse else ''}"
                    f"{' BHLD view' if transposed else ''}")
            yield name, dtype, _case(interleaved, rotary_dim, inverse, transposed, dtype, device), OUTPUTS
