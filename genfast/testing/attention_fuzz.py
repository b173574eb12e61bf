"""Random attention calls against the float64 reference: `genfast check --fuzz N`.

Each case draws a shape (batch, query and key/value heads, lengths from 1 to hundreds or a decoding
step against a long cache, head dims from 16 to 256, v's head dim apart from q's), the options
(causal alignment, window, a bool or additive mask of any broadcast shape, sometimes hiding whole
rows or whole blocks, ALiBi slopes per head or per batch and head, soft-capping, scale, dropout,
a deterministic backward), the inputs' layout (contiguous, (B, L, H, D) transposed as transformers
and diffusers hold them, or strided) or a packed variable-length batch. The output, log-sum-exp and
the gradients of q, k, v and an additive mask are compared with the reference by the error-ratio
rule (genfast.testing.tolerances.compare_with_reference). Case n of seed s is drawn from seed s + n
alone, so `--seed s+n --fuzz 1` repeats it.
"""

import math
import random
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from ..attention import attention, attention_varlen
from ..random import PhiloxGenerator
from .tolerances import compare_with_reference

OUTPUTS = ("o", "lse")
GRADS = ("grad q", "grad k", "grad v", "grad attn_mask")

# The gradients' floor in float32, relative to their scale. FlashAttention's backward (every fused
# backend's) takes dS = P (dP - rowsum(dO o)): two float32 dot products of length D that cancel, off
# by about sqrt(D) of their units of rounding (times 1 / (1 - dropout_p), which scales both). The
# reference's softmax backward does not cancel so when a row sees one key or a few, and its float32
# error can be ~0; and the gradient of a mask broadcast over heads and rows sums that error over
# every element of dS (112k of them in one case). The same formula in float32 torch ops errs by the
# same order. Over 1,100 cases on the CPU kernel the worst needed 1.2e-5 (one key, dropout 0.7)
# and 1.1e-5 (a (B, 1, 1, 1) additive mask's gradient); a kernel's bug shows at 1e-3 or more.
FLOAT32_GRAD_FLOOR = 5e-5


@dataclass
class Limits:
    """How large a drawn case may be on a backend: the Triton interpreter runs each tile in Python."""
    length: int
    cache: int  # a decoding step's key length
    heads: int
    batch: int
    dim: int


LIMITS = {
    "cuda": Limits(length=1100, cache=9000, heads=8, batch=3, dim=256),
    "cpu": Limits(length=300, cache=2100, heads=6, batch=3, dim=256),
    "interpreted": Limits(length=70, cache=300, heads=3, batch=2, dim=64),
}


@dataclass
class FuzzCase:
    seed: int
    varlen: bool
    batch: int
    heads: int
    kv_heads: int
    q_len: int  # varlen: the longest sequence
    k_len: int
    dim: int
    v_dim: int
    lengths_q: Optional[Tuple[int, ...]] = None  # varlen
    lengths_k: Optional[Tuple[int, ...]] = None
    causal: Optional[str] = None
    window: Optional[Tuple[int, int]] = None
    mask: Optional[str] = None  # "bool" or "additive"
    mask_shape: Optional[Tuple[int, ...]] = None
    mask_hides: Optional[str] = None  # "rows" or "blocks": whole rows or whole 64 x 64 blocks hidden
    alibi: Optional[str] = None  # "heads" or "batch"
    softcap: Optional[float] = None
    scale: Optional[float] = None
    dropout_p: float = 0.0
    deterministic: bool = False
    layout: str = "contiguous"  # or "transposed" ((B, L, H, D) storage) or "strided"

    def describe(self) -> str:
        if self.varlen:
            shape = (f"varlen H={self.heads}/{self.kv_heads} Lq={'/'.join(map(str, self.lengths_q))} "
                     f"Lk={'/'.join(map(str, self.lengths_k))}")
        else:
            shape = f"B={self.batch} H={self.heads}/{self.kv_heads} Lq={self.q_len} Lk={self.k_len}"
        parts = [f"seed={self.seed}", shape, f"D={self.dim}/{self.v_dim}"]
        if self.causal:
            parts.append(f"causal={self.causal}")
        if self.window:
            parts.append(f"window={self.window}")
        if self.mask:
            hides = f" hiding {self.mask_hides}" if self.mask_hides else ""
            parts.append(f"{self.mask} mask {'x'.join(map(str, self.mask_shape))}{hides}")
        if self.alibi:
            parts.append(f"alibi per {self.alibi}")
        if self.softcap:
            parts.append(f"softcap={self.softcap:g}")
        if self.scale is not None:
            parts.append(f"scale={self.scale:.4g}")
        if self.dropout_p:
            parts.append(f"dropout={self.dropout_p:g}")
        if self.deterministic:
            parts.append("deterministic")
        if self.layout != "contiguous":
            parts.append(self.layout)
        return " ".join(parts)


def _length(rng: random.Random, most: int) -> int:
    """1 to most, most often small or just past a block edge."""
    kind = rng.random()
    if kind < 0.2:
        return rng.randint(1, min(most, 20))
    if kind < 0.4:
        edge = rng.choice([e for e in (64, 128, 256) if e < most] or [most])
        return max(1, min(most, edge + rng.randint(-1, 1)))
    return rng.randint(1, most)


def _head_dim(rng: random.Random, most: int) -> int:
    common = [d for d in (16, 32, 64, 80, 96, 128, 256) if d <= most]
    return rng.choice(common) if rng.random() < 0.6 else rng.randint(16, most)


def draw_case(seed: int, limits: Limits) -> FuzzCase:
    """The case seed gives, within limits."""
    rng = random.Random(seed)
    kv_heads = rng.randint(1, limits.heads)
    heads = kv_heads * rng.choice([d for d in range(1, limits.heads // kv_heads + 1)])
    dim = _head_dim(rng, limits.dim)
    v_dim = dim if rng.random() < 0.8 else _head_dim(rng, limits.dim)
    case = FuzzCase(seed=seed, varlen=rng.random() < 0.2, batch=rng.randint(1, limits.batch), heads=heads,
                    kv_heads=kv_heads, q_len=0, k_len=0, dim=dim, v_dim=v_dim)
    if case.varlen:
        count = rng.randint(1, 4)
        case.lengths_q = tuple(rng.choice([0, _length(rng, limits.length)]) if rng.random() < 0.15
                               else _length(rng, limits.length) for _ in range(count))
        same = rng.random() < 0.5
        case.lengths_k = case.lengths_q if same else tuple(_length(rng, limits.length) for _ in range(count))
        case.batch, case.q_len, case.k_len = count, max(case.lengths_q), max(case.lengths_k)
        case.causal = rng.choice([None, "bottom_right"] + (["top_left"] if same else []))
    elif rng.random() < 0.15:  # a decoding step: a few queries against a long cache
        case.q_len, case.k_len = rng.randint(1, 4), rng.randint(1, limits.cache)
        case.causal = rng.choice([None, "bottom_right"])
    else:
        case.q_len, case.k_len = _length(rng, limits.length), _length(rng, limits.length)
        case.causal = rng.choice([None, None, "top_left", "bottom_right"])
    if rng.random() < 0.25:
        case.window = (rng.choice([-1, rng.randint(0, 80)]), rng.choice([-1, -1, 0, rng.randint(0, 40)]))
    if not case.varlen and rng.random() < 0.4:
        case.mask = rng.choice(["bool", "additive"])
        full = (case.batch, case.heads, case.q_len, case.k_len)
        kept = rng.randint(0, 4)  # trailing dims given; each of them 1 (broadcast) or full
        case.mask_shape = tuple(1 if rng.random() < 0.3 else f for f in full[4 - kept:])
        if rng.random() < 0.4:
            case.mask_hides = rng.choice(["rows", "blocks"])
    if rng.random() < 0.2:
        case.alibi = rng.choice(["heads", "batch"])
    if rng.random() < 0.2:
        case.softcap = round(rng.uniform(1.0, 50.0), 2)
    if rng.random() < 0.2:
        case.scale = rng.uniform(0.3, 2.0) / math.sqrt(dim)
    if rng.random() < 0.2:
        case.dropout_p = rng.choice([0.1, 0.3, 0.7])
    case.deterministic = rng.random() < 0.3
    case.layout = rng.choice(["contiguous", "contiguous", "transposed", "strided"])
    return case


def _storage(shape, layout: str, generator, device, dtype) -> torch.Tensor:
    """Normal values of shape (batch, heads, length, dim) or, varlen, (total, heads, dim), laid out
    as asked (after the copy to device and dtype, which would make a strided tensor contiguous):
    transposed keeps (batch, length, heads, dim) in memory; strided skips every other row."""
    if layout == "transposed" and len(shape) == 4:
        b, h, n, d = shape
        return torch.randn(b, n, h, d, generator=generator).to(device=device, dtype=dtype).transpose(1, 2)
    if layout == "strided":
        wide = torch.randn(*shape[:-2], 2 * shape[-2], shape[-1], generator=generator)
        return wide.to(device=device, dtype=dtype)[..., ::2, :]
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def _mask(case: FuzzCase, generator) -> torch.Tensor:
    shape = case.mask_shape
    if case.mask == "bool":
        mask = torch.rand(shape, generator=generator) < 0.8
    else:
        mask = torch.randn(shape, generator=generator) * 2
        mask = mask.masked_fill(torch.rand(shape, generator=generator) < 0.1, float("-inf"))
    if case.mask_hides:  # (Lq, Lk) at least, so that rows and blocks can be hidden; the rest still broadcast
        mask = mask.expand(tuple(shape[:-2]) + (case.q_len, case.k_len)).clone()
        hidden = False if case.mask == "bool" else float("-inf")
        if case.mask_hides == "rows":
            rows = torch.randperm(mask.shape[-2], generator=generator)[: max(1, mask.shape[-2] // 4)]
            mask[..., rows, :] = hidden
        else:
            for i0 in range(0, mask.shape[-2], 64):
                for j0 in range(0, mask.shape[-1], 64):
                    if torch.rand((), generator=generator) < 0.5:
                        mask[..., i0:i0 + 64, j0:j0 + 64] = hidden
    return mask


def make_run(case: FuzzCase, dtype: torch.dtype, device):
    """run(impl, cast=None): [o, lse, grad q, grad k, grad v(, grad of the additive mask)] of the case;
    the loss weighs o and the finite lse with fixed random weights."""
    g = torch.Generator().manual_seed(case.seed)
    if case.varlen:
        total_q, total_k = sum(case.lengths_q), sum(case.lengths_k)
        shapes = ((total_q, case.heads, case.dim), (total_k, case.kv_heads, case.dim),
                  (total_k, case.kv_heads, case.v_dim))
    else:
        shapes = ((case.batch, case.heads, case.q_len, case.dim), (case.batch, case.kv_heads, case.k_len, case.dim),
                  (case.batch, case.kv_heads, case.k_len, case.v_dim))
    q, k, v = (_storage(shape, case.layout, g, device, dtype) for shape in shapes)
    mask = _mask(case, g).to(device) if case.mask else None
    if mask is not None and case.mask == "additive":
        mask = mask.to(dtype)
    slopes = None
    if case.alibi:
        slopes = torch.rand((case.batch, case.heads) if case.alibi == "batch" else (case.heads,), generator=g)
        slopes = (slopes * 0.3).to(device)
    o_shape = shapes[0][:-1] + (case.v_dim,)
    weights = torch.randn(o_shape, generator=g, dtype=torch.float64).to(device)
    lse_shape = (case.heads, shapes[0][0]) if case.varlen else shapes[0][:-1]
    lse_weights = torch.randn(lse_shape, generator=g, dtype=torch.float64).to(device)
    cu_q = cu_k = None
    if case.varlen:
        cu_q = torch.tensor((0,) + case.lengths_q).cumsum(0).to(device=device, dtype=torch.int32)
        cu_k = cu_q if case.lengths_k is case.lengths_q else (
            torch.tensor((0,) + case.lengths_k).cumsum(0).to(device=device, dtype=torch.int32))

    def run(impl, cast=None):
        leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in (q, k, v)]
        m = mask
        if m is not None and m.is_floating_point():
            m = (m if cast is None else m.to(cast)).detach().requires_grad_()
            leaves.append(m)
        s = slopes if slopes is None or cast is None else slopes.to(cast)
        options = dict(causal=case.causal, window=case.window, alibi_slopes=s, softcap=case.softcap,
                       scale=case.scale, dropout_p=case.dropout_p, generator=PhiloxGenerator(case.seed),
                       deterministic=case.deterministic, return_lse=True, impl=impl)
        if case.varlen:
            o, lse = attention_varlen(*leaves[:3], cu_q, cu_k, case.q_len, case.k_len, **options)
        else:
            o, lse = attention(*leaves[:3], m, enable_gqa=True, **options)
        loss = (o.double() * weights).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * lse_weights).sum()
        return [o, lse, *torch.autograd.grad(loss, leaves)]

    return run


def limits_for(device: str, impl: str) -> Limits:
    return LIMITS["interpreted" if device == "cpu" and impl == "triton" else device]


def fuzz(device: str, runs, count: int, seed: int = 0) -> Iterator[tuple]:
    """(description, impl, dtype, max error, passed, message) for count random cases on each (impl,
    dtype) of runs; a case a backend refuses, or crashes on, fails with the error."""
    for n in range(count):
        for impl, dtype in runs:
            case = draw_case(seed + n, limits_for(device, impl))
            try:
                floor = FLOAT32_GRAD_FLOOR if dtype == torch.float32 else 1e-6
                result = compare_with_reference(make_run(case, dtype, device), impl, OUTPUTS, grad_floor=floor,
                                                grads=GRADS)
            except Exception as error:  # noqa: BLE001  (a refusal or a crash is this case's failure)
                result = (float("nan"), False, f"{type(error).__name__}: {str(error).splitlines()[0]}")
            yield (case.describe(), impl, dtype) + result
