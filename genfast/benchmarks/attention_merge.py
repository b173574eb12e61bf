"""Merging two partial attentions, as cascade inference does after attending to a shared prefix and
to each request's own keys (and ring attention after each step), against its peers, forward and
forward+backward: o (tokens, 32 heads, 128) and lse (tokens, 32) per state.

Peers: the merge in eager PyTorch as it is usually written (logaddexp of the lse, each o scaled by
exp(lse_s - lse) and summed, in float32), torch.compile of it, FlashInfer's merge_state where
installed (GPU; timed only: it takes its lse in base 2), and the eager reference
(genfast.reference.attention_merge). genfast takes the two states as separate tensors, read where
they lie, as the peers do. The "out=, genfast" rows write the forward into buffers allocated once,
as a serving loop or a CUDA graph's static outputs would (vLLM's and FlashInfer's in-place merges);
their ratio, as the peers', is to genfast's time with a new output.
Figures: median time, GB/s (each state's o and lse read, the merged ones written; the backward's
gradients read and written likewise), the fraction of a large copy's bandwidth measured beside each
size, and each peer's time over genfast's.
"""

import importlib

import torch

from ..attention_merge import merge_attention
from ..reference.attention_merge import attention_merge as reference_merge
from .elementwise import default_dtypes, fused_impls, run_groups

HEADS, DIM = 32, 128  # Llama 3 8B's attention
SIZES_CPU = [1 << 20, 1 << 22, 1 << 24]  # elements of one state's o: 256, 1024 and 4096 tokens
SIZES_GPU = [1 << 20, 1 << 24, 1 << 26]
QUICK_SIZES = [1 << 20, 1 << 22]


def eager_merge(o_a, lse_a, o_b, lse_b):
    """Two states merged as user code writes it (vLLM's and ring attention's PyTorch forms)."""
    lse = torch.logaddexp(lse_a, lse_b)
    o = o_a.float() * torch.exp(lse_a - lse)[..., None] + o_b.float() * torch.exp(lse_b - lse)[..., None]
    return o.to(o_a.dtype), lse


def _reference(o_a, lse_a, o_b, lse_b):
    return reference_merge(torch.stack((o_a, o_b)), torch.stack((lse_a, lse_b)))


def _peers(device, dtype):
    """[(name, fn(o_a, lse_a, o_b, lse_b))] for FlashInfer where importable (GPU only, 16-bit states:
    its merge_state dispatches no float32), forward only."""
    if device != "cuda" or dtype == torch.float32:
        return []
    try:
        merge_state = importlib.import_module("flashinfer").merge_state
    except (ImportError, AttributeError):
        return []
    return [("FlashInfer merge_state", lambda o_a, lse_a, o_b, lse_b: merge_state(o_a, lse_a, o_b, lse_b))]


def run(device: str, quick: bool = False, progress=None, dtypes=None, sizes=None):
    """Returns result rows; sizes are element counts of one state's o (multiples of HEADS * DIM)."""
    if sizes is None:
        sizes = QUICK_SIZES if quick else (SIZES_GPU if device == "cuda" else SIZES_CPU)
    compiled = torch.compile(eager_merge, dynamic=False)
    functions = [(f"genfast {impl}", lambda o_a, lse_a, o_b, lse_b, impl=impl:
                  merge_attention([o_a, o_b], [lse_a, lse_b], impl=impl)) for impl in fused_impls(device)]
    functions += [("eager torch", eager_merge), ("torch.compile", compiled), ("eager reference", _reference)]

    def make_candidates(numel, dtype):
        tokens = max(1, numel // (HEADS * DIM))
        g = torch.Generator().manual_seed(0)
        o_a, o_b = (torch.randn(tokens, HEADS, DIM, generator=g).to(device=device, dtype=dtype) for _ in range(2))
        lse_a, lse_b = (torch.randn(tokens, HEADS, generator=g).mul(3.0).to(device) for _ in range(2))
        leaves = [t.clone().requires_grad_() for t in (o_a, lse_a, o_b, lse_b)]
        grads = (torch.randn_like(o_a), torch.randn_like(lse_a))

        def training(fn):
            return lambda: torch.autograd.grad(fn(*leaves), leaves, grads)

        forward = [(name, torch.no_grad()(lambda fn=fn: fn(o_a, lse_a, o_b, lse_b)))
                   for name, fn in functions + _peers(device, dtype)]
        into = torch.empty_like(o_a), torch.empty_like(lse_a)
        forward[len(fused_impls(device)):len(fused_impls(device))] = [
            (f"out=, genfast {impl}", torch.no_grad()(lambda impl=impl: merge_attention(
                [o_a, o_b], [lse_a, lse_b], out=into, impl=impl))) for impl in fused_impls(device)]
        both = [(name, training(fn)) for name, fn in functions]
        o_bytes, lse_bytes = o_a.numel() * o_a.element_size(), lse_a.numel() * 4
        moved = 3 * (o_bytes + lse_bytes)  # two states read, the merged one written
        backward = 3 * (o_bytes + lse_bytes) + 2 * (o_bytes + lse_bytes)  # states and gradients read, gradients written
        return {"forward": (moved, forward), "forward+backward": (moved + backward, both)}

    return run_groups("attention merge (2 states)", device, sizes, dtypes or default_dtypes(device), quick, progress,
                      make_candidates)
