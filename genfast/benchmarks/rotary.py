"""The rotary embedding of a Llama-style layer's queries and keys (transformers' apply_rotary_pos_emb:
q (batch, heads, seqlen, head_dim), k with a quarter of the heads, cos and sin (1, seqlen, head_dim))
against its peers, forward and forward+backward.

Peers: the same call in eager PyTorch (transformers' rotate_half form, six elementwise ops a
tensor), torch.compile of it, Liger-Kernel's liger_rotary_pos_emb and FlashAttention's
apply_rotary_emb where installed (GPU), and the eager reference (genfast.reference.rotary).
Figures: median time, GB/s (q and k read and written once a pass; the tables are not counted), the
fraction of a large copy's bandwidth measured beside each size, and each peer's time over genfast's.
"""

import importlib

import torch

from ..integrations.transformers_rotary import apply_rotary_pos_emb
from ..reference.rotary import rotary as reference_rotary
from .elementwise import default_dtypes, fused_impls, run_groups

HEADS, KV_HEADS, DIM = 32, 8, 128  # Llama 3 8B's attention
SIZES_CPU = [1 << 20, 1 << 22, 1 << 24]  # elements of q: 256, 1024 and 4096 tokens
SIZES_GPU = [1 << 20, 1 << 24, 1 << 26]
QUICK_SIZES = [1 << 20, 1 << 22]


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def eager_apply_rotary_pos_emb(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (Llama), as its models run it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _reference(q, k, cos, sin):
    half = cos.shape[-1] // 2
    positions = torch.arange(q.shape[2], device=q.device)
    turned = [reference_rotary(t.transpose(1, 2), cos[0, :, :half], sin[0, :, :half], positions, False)
              for t in (q, k)]
    return turned[0].transpose(1, 2), turned[1].transpose(1, 2)


def _peers(device):
    """[(name, fn(q, k, cos, sin))] for Liger-Kernel and FlashAttention where importable (GPU only)."""
    if device != "cuda":
        return []
    peers = []
    try:
        liger = importlib.import_module("liger_kernel.transformers.rope").liger_rotary_pos_emb
        peers.append(("Liger-Kernel rope", lambda q, k, cos, sin: liger(q, k, cos, sin)))
    except (ImportError, AttributeError):
        pass
    try:
        flash = importlib.import_module("flash_attn.layers.rotary").apply_rotary_emb

        def flash_rope(q, k, cos, sin):
            half = cos.shape[-1] // 2
            tables = (cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous())
            return tuple(flash(t.transpose(1, 2), *tables).transpose(1, 2) for t in (q, k))

        peers.append(("FlashAttention apply_rotary_emb", flash_rope))
    except (ImportError, AttributeError):
        pass
    return peers


def run(device: str, quick: bool = False, progress=None, dtypes=None, sizes=None):
    """Returns result rows; sizes are element counts of q (multiples of HEADS * DIM)."""
    if sizes is None:
        sizes = QUICK_SIZES if quick else (SIZES_GPU if device == "cuda" else SIZES_CPU)
    compiled = torch.compile(eager_apply_rotary_pos_emb, dynamic=False)
    functions = [(f"genfast {impl}", lambda q, k, cos, sin, impl=impl: apply_rotary_pos_emb(q, k, cos, sin, impl=impl))
                 for impl in fused_impls(device)]
    functions += [("eager torch (rotate_half)", eager_apply_rotary_pos_emb), ("torch.compile", compiled)]
    functions += _peers(device) + [("eager reference", _reference)]

    def make_candidates(numel, dtype):
        seqlen = max(1, numel // (HEADS * DIM))
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, HEADS, seqlen, DIM, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(1, KV_HEADS, seqlen, DIM, generator=g).to(device=device, dtype=dtype)
        angles = torch.arange(seqlen, dtype=torch.float64)[:, None] * 500000.0 ** (
            -torch.arange(0, DIM, 2, dtype=torch.float64) / DIM)
        angles = torch.cat((angles, angles), -1)[None]  # (1, seqlen, DIM), as LlamaRotaryEmbedding returns
        cos, sin = (t.to(device=device, dtype=dtype) for t in (angles.cos(), angles.sin()))
        leaves = [t.clone().requires_grad_() for t in (q, k)]
        grads = [torch.randn_like(t) for t in (q, k)]

        def training(fn):
            return lambda: torch.autograd.grad(fn(*leaves, cos, sin), leaves, grads)

        forward = [(name, torch.no_grad()(lambda fn=fn: fn(q, k, cos, sin))) for name, fn in functions]
        both = [(name, training(fn)) for name, fn in functions]
        moved = 2 * (q.numel() + k.numel()) * q.element_size()  # read once, written once
        return {"forward": (moved, forward), "forward+backward": (2 * moved, both)}

    return run_groups("rotary (q, k)", device, sizes, dtypes or default_dtypes(device), quick, progress,
                      make_candidates)
