"""The definition of genfast's normalizing-flow ops, in plain PyTorch.

Each computes in the dtype of its inputs (call it with float64 inputs for an exact oracle) and
accumulates log-determinants in float32 at least. See kernels/common/affine_coupling.h, actnorm.h
and lu_weight.h for the formulas.
"""

import math

import torch
import torch.nn.functional as F

SCALE_FNS = ("exp", "sigmoid", "softplus", "tanh", "atan", "soft_bound")
ATAN_FACTOR = 0.636  # FrEIA's soft clamp: clamp * 0.636 * atan(u / clamp), so |log s| < clamp


def logdet_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_and_log_scale(u: torch.Tensor, scale_fn: str, scale_param: float):
    """(s, log s) for the unconstrained scale u, each parameterization as its source writes it."""
    p = scale_param
    if scale_fn == "sigmoid":  # nflows (p = 1e-3) and Glow (p = 0)
        s = torch.sigmoid(u + 2) + p
        return s, torch.log(s) if p > 0 else F.logsigmoid(u + 2)
    if scale_fn == "softplus":
        s = F.softplus(u) + p
        return s, torch.log(s)
    if scale_fn == "exp":
        log_s = u
    elif scale_fn == "tanh":  # RealNVP's and FrEIA's tanh soft clamp
        log_s = p * torch.tanh(u / p)
    elif scale_fn == "atan":  # FrEIA's default
        log_s = p * ATAN_FACTOR * torch.atan(u / p)
    elif scale_fn == "soft_bound":  # zuko: p = |log(slope)|
        log_s = u / (1 + u.abs() / p)
    else:
        raise ValueError(f"scale_fn must be one of {SCALE_FNS}, got {scale_fn!r}")
    return torch.exp(log_s), log_s


def soft_bound_param(slope: float) -> float:
    """zuko's MonotonicAffineTransform bounds log s by |log(slope)|."""
    return abs(math.log(slope))


def expand_mask(mask: torch.Tensor, sample_shape) -> torch.Tensor:
    """The mask over a sample's shape: a channel (feature) mask of shape (C,) is broadcast over
    the spatial dims."""
    sample_shape = tuple(sample_shape)
    if tuple(mask.shape) == sample_shape:
        return mask
    return mask.reshape((-1,) + (1,) * (len(sample_shape) - 1)).expand(sample_shape)


def affine_coupling(x, shift, scale, mask, scale_fn="exp", scale_param=0.0, glow_order=False, inverse=False):
    """(y, logdet): the affine coupling transform of x (see kernels/common/affine_coupling.h).

    mask (bool) marks the transformed elements. shift and scale either have x's shape (their
    values at identity elements are ignored) or hold, per sample, just the transformed elements in
    the order of x's flattened elements (nflows' and Glow's layout). Written with gathers and
    selects of static shapes, so that torch.compile can fuse it."""
    batch = x.shape[0]
    m = expand_mask(mask, x.shape[1:]).reshape(-1)
    xf = x.reshape(batch, -1)
    t, u = shift.reshape(batch, -1), scale.reshape(batch, -1)
    if shift.shape != x.shape:  # each element's t and u, read from the compact rows
        position = (torch.cumsum(m, 0) - 1).clamp(min=0)
        t, u = t[:, position], u[:, position]
    s, log_s = scale_and_log_scale(u, scale_fn, scale_param)
    if inverse:
        out = xf / s - t if glow_order else (xf - t) / s
    else:
        out = (xf + t) * s if glow_order else xf * s + t
    y = torch.where(m, out, xf)
    logdet = torch.where(m, log_s, 0).to(logdet_dtype(x.dtype)).sum(1)
    return y.reshape(x.shape), -logdet if inverse else logdet


def actnorm(x, log_scale, bias, glow_order=False, inverse=False):
    """(y, logdet): per-channel affine map of x (B, C, *spatial) and its log-determinant,
    spatial size * sum(log_scale), the same for every sample."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    ls = log_scale.to(x.dtype).reshape(shape)
    b = bias.to(x.dtype).reshape(shape)
    if inverse:
        y = x * torch.exp(-ls) - b if glow_order else (x - b) * torch.exp(-ls)
    else:
        y = (x + b) * torch.exp(ls) if glow_order else x * torch.exp(ls) + b
    spatial = math.prod(x.shape[2:])
    logdet = (spatial * log_scale.to(logdet_dtype(x.dtype)).sum()).expand(x.shape[0])
    return y, -logdet if inverse else logdet


def lu_weight(lower, upper, log_diag, sign, perm):
    """(W, log|det W|) of Glow's LU-parameterized 1x1 convolution: W = P L U with
    L = strict_lower(lower) + I, U = strict_upper(upper) + diag(sign * exp(log_diag)), and
    row i of W = row perm[i] of L U."""
    n = lower.shape[0]
    eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
    lo = torch.tril(lower, -1) + eye
    up = torch.triu(upper, 1) + torch.diag(sign.to(log_diag.dtype) * torch.exp(log_diag))
    return (lo @ up)[perm], log_diag.sum()
