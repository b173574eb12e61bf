"""NADE's fused log-likelihood and sampling, and MADE's masked linear layer, against their peers.

NADE (x (B, D) binary, W (H, D), c, V (D, H), b), float32:
- log-likelihood, forward and forward+backward (gradients to W, c, V, b): genfast's fused ops; the
  eager D-loop (a Python loop over the dimensions keeping the running pre-activation, as most NADE
  code is written); the best vectorized PyTorch formulation, cumulative sums over the running
  pre-activations (genfast.reference.nade.log_prob, which holds B x D x H); its torch.compile;
- sampling B samples: genfast's one launch against the Python loop over D (reference.sample).
MADE's masked linear layer (B x D inputs to H units, the mask from degrees): genfast against
F.linear(x, W * M) eager and compiled, forward and forward+backward.

Each row records its time, GFLOP/s, the peak extra memory of one call (outputs included; see
peak_memory.py), and the GEMM throughput measured in the same run. FLOPs: NADE's forward
4 B D H (a step's dot product and update), sampling the same, forward+backward 3x forward; the
masked layer 2 B D H forward (all of W's entries counted), 3x that with the backward.
"""

import math

import torch

from ..made import made_linear
from ..nade import nade_log_prob, nade_sample
from ..reference import nade as reference
from .compute import gemm_gflops, time_groups
from .elementwise import fused_impls

CONFIGS = [(784, 500, 256), (64, 128, 256)]  # (D, H, B): binarized MNIST's NADE; digits'
QUICK_CONFIGS = [(784, 500, 256)]


def d_loop_log_prob(x, W, c, V, b):
    """NADE as it is usually written: a loop over the D dimensions with the running pre-activation."""
    a = c.expand(x.shape[0], -1)
    log_prob = x.new_zeros(x.shape[0])
    for d in range(x.shape[1]):
        logit = b[d] + torch.sigmoid(a) @ V[d]
        log_prob = log_prob + x[:, d] * logit - torch.nn.functional.softplus(logit)
        a = a + x[:, d:d + 1] * W[:, d]
    return log_prob


def _grad_of(fn, leaves):
    return lambda: torch.autograd.grad(fn(*leaves).sum(), leaves[1:])


def _nade_groups(dims, hidden, batch, device, dtype, fused, compiled):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, dims, generator=g) < 0.3).to(device=device, dtype=dtype)
    params = [(torch.randn(*shape, generator=g) * 0.05).to(device=device, dtype=dtype)
              for shape in ((hidden, dims), (hidden,), (dims, hidden), (dims,))]
    leaves = [x] + [p.clone().requires_grad_() for p in params]
    candidates = [(f"genfast {impl}", lambda *a, impl=impl: nade_log_prob(*a, impl=impl)) for impl in fused]
    candidates += [("eager D-loop", d_loop_log_prob), ("eager cumsum", reference.log_prob),
                   ("torch.compile cumsum", compiled)]
    flops = 4 * batch * dims * hidden
    uniforms = torch.rand(batch, dims, generator=g).to(device=device, dtype=dtype)
    sampling = [(f"genfast {impl}", lambda impl=impl: nade_sample(*params, batch, uniforms=uniforms, impl=impl))
                for impl in fused]
    sampling.append(("eager D-loop", lambda: reference.sample(*params, uniforms)))
    return {
        "NADE log-likelihood forward": (flops, [(name, lambda fn=fn: fn(x, *params)) for name, fn in candidates]),
        "NADE log-likelihood forward+backward": (3 * flops, [(name, _grad_of(fn, leaves)) for name, fn in candidates]),
        "NADE sampling": (flops, sampling),
    }


def _made_groups(dims, hidden, batch, device, dtype, fused, compiled):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, dims, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(hidden, dims, generator=g) / math.sqrt(dims)).to(device=device, dtype=dtype)
    bias = torch.zeros(hidden, device=device, dtype=dtype)
    degrees = reference.made_degrees(dims, [hidden])
    in_degrees, out_degrees = degrees[0].to(device), degrees[1].to(device)
    mask = reference.degree_mask(in_degrees, out_degrees).to(dtype)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    candidates = [(f"genfast {impl}", lambda x, w, b, impl=impl: made_linear(x, w, b, in_degrees, out_degrees,
                                                                             impl=impl)) for impl in fused]
    candidates += [("eager F.linear(x, W * M)", lambda x, w, b: reference.masked_linear(x, w, mask, b)),
                   ("torch.compile F.linear(x, W * M)", lambda x, w, b: compiled(x, w, mask, b))]
    flops = 2 * batch * dims * hidden
    return {
        "MADE masked linear forward": (flops, [(name, lambda fn=fn: fn(x, weight, bias)) for name, fn in candidates]),
        "MADE masked linear forward+backward": (
            3 * flops, [(name, lambda fn=fn: torch.autograd.grad(fn(*leaves).sum(), leaves)) for name, fn in candidates]),
    }


def run(device: str, quick: bool = False, progress=None, dtypes=None, sizes=None):
    """Result rows; `sizes`, if given, are B x D element counts at D = 784, H = 500."""
    say = progress or (lambda message: None)
    configs = [(784, 500, max(1, s // 784)) for s in sizes] if sizes else (QUICK_CONFIGS if quick else CONFIGS)
    fused = fused_impls(device)
    dtype = torch.float32
    say("nade: GEMM throughput")
    gemm = gemm_gflops(device, dtype, quick)
    compiled_log_prob = torch.compile(reference.log_prob, dynamic=False)
    compiled_masked = torch.compile(reference.masked_linear, dynamic=False)
    rows = []
    with torch._dynamo.config.patch(recompile_limit=64):
        for dims, hidden, batch in configs:
            groups = {**_nade_groups(dims, hidden, batch, device, dtype, fused, compiled_log_prob),
                      **_made_groups(dims, hidden, batch, device, dtype, fused, compiled_masked)}
            rows += time_groups("nade", device, dtype, f"D={dims} H={hidden} B={batch}", batch * dims, groups, gemm,
                                quick, say)
    return rows
