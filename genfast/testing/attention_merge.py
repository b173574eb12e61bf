"""`genfast check` cases of merging partial attentions: outputs (o, lse) and gradients (of the states'
o and lse) of each fused backend against the float64 reference, by the error-ratio rule; two and
five states, states without keys and a row without any, states along dim 0 and 1, packed outputs
with FlashAttention's varlen lse transposed, and FlashInfer's base-2 lse."""

import math

import torch

from ..attention_merge import merge_attention

OUTPUTS = ("out", "lse")
GRADS = ("grad_o", "grad_lse")


def _case(states, head_dim, dim, varlen_lse, lse_base, dtype, device):
    g = torch.Generator().manual_seed(states)
    tokens, heads = 37, 4
    o = torch.randn(states, tokens, heads, head_dim, generator=g)
    lse = torch.randn(states, heads, tokens, generator=g).mul(3.0).transpose(1, 2)  # (heads, tokens) a state, as .T
    lse = lse if varlen_lse else lse.contiguous()
    lse[torch.rand(lse.shape, generator=g) < 0.2] = float("-inf")
    lse[:, 0, 0] = float("-inf")
    o, lse = o.to(device=device, dtype=dtype), lse.to(device)
    if dim == 1:
        o, lse = o.transpose(0, 1).contiguous(), lse.transpose(0, 1).contiguous()
    weights = torch.Generator().manual_seed(1)
    grads = (torch.randn(o.shape[:dim] + o.shape[dim + 1:], generator=weights),
             torch.randn(lse.shape[:dim] + lse.shape[dim + 1:], generator=weights))

    def run(impl, cast=None):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (o, lse)]
        out, out_lse = merge_attention(*leaves, dim, lse_base=lse_base, impl=impl)
        return [out, out_lse, *torch.autograd.grad((out, out_lse), leaves, (grads[0].to(out), grads[1].to(out_lse)))]

    return run


def cases(device, dtypes):
    """(name, dtype, run, output names) for each case."""
    for dtype in dtypes:
        for states, head_dim, dim, varlen_lse, lse_base in ((2, 128, 0, True, math.e), (5, 64, 1, False, math.e),
                                                            (3, 17, 0, False, math.e), (2, 64, 1, False, 2)):
            name = (f"{states} states, head dim {head_dim}, states along dim {dim}"
                    f"{', varlen lse (heads, tokens)' if varlen_lse else ''}{', base-2 lse' if lse_base == 2 else ''}")
            yield name, dtype, _case(states, head_dim, dim, varlen_lse, lse_base, dtype, device), OUTPUTS
