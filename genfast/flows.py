"""Fused normalizing-flow layers: the affine coupling transform with its log-determinant, ActNorm,
and the LU-parameterized weight of Glow's invertible 1x1 convolution.

Each returns (output, log|det J|) from one pass over memory, forward (density direction) or inverse
(sampling direction, log-det negated), and trains through fused backward kernels. Log-dets are
float32 (float64 for the float64 reference), one per sample.
"""

import math
from typing import Optional, Tuple

import torch

from . import _backend, _checks
from .ops import actnorm as actnorm_op
from .ops import affine_coupling as coupling_op
from .ops import lu_weight as lu_op
from .reference import flows as reference
from .reference.flows import SCALE_FNS

Tensor = torch.Tensor
ORDERS = ("affine", "glow")
DEFAULT_EPS = {"sigmoid": 1e-3, "softplus": 1e-3}  # nflows' value; Glow uses sigmoid with eps=0


def scale_param(scale_fn: str, eps: Optional[float] = None, clamp: float = 2.0, slope: float = 1e-3) -> float:
    """The one parameter the kernels take for `scale_fn`."""
    _checks.check_choice("scale_fn", scale_fn, SCALE_FNS)
    if scale_fn in ("sigmoid", "softplus"):
        eps = DEFAULT_EPS[scale_fn] if eps is None else eps
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        return float(eps)
    if scale_fn in ("tanh", "atan"):
        if not clamp > 0:
            raise ValueError(f"clamp must be > 0, got {clamp}")
        return float(clamp)
    if scale_fn == "soft_bound":
        if not 0 < slope < 1:
            raise ValueError(f"slope must be in (0, 1), got {slope}")
        return reference.soft_bound_param(slope)
    return 0.0


def coupling_index(mask: Tensor, sample_shape, compact: bool) -> Tensor:
    """The int32 index the kernels read (see kernels/common/affine_coupling.h): for each element of
    a sample, -1 if `mask` leaves it unchanged, else the position of its shift and scale, in a
    compact row of the transformed elements or (compact=False) in a row of the sample's layout.
    Modules compute it once; mask is bool over sample_shape, or over its first dim (channels)."""
    sample_shape = tuple(sample_shape)
    _check_mask(mask, sample_shape)
    m = reference.expand_mask(mask, sample_shape).reshape(-1)
    if compact:
        position = torch.cumsum(m, 0, dtype=torch.int32) - 1
    else:
        position = torch.arange(m.numel(), dtype=torch.int32, device=m.device)
    return torch.where(m, position, torch.full_like(position, -1))


def _check_mask(mask, sample_shape):
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (or an int32 coupling_index), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != sample_shape and not (mask.dim() == 1 and len(sample_shape) >= 1
                                           and mask.shape[0] == sample_shape[0]):
        raise ValueError(f"mask must have the shape of a sample {sample_shape} or one entry per channel "
                         f"({sample_shape[0] if sample_shape else 0},), got {tuple(mask.shape)}")


def _check_input(x, impl):
    """float32, float16 or bfloat16; also float64 for the reference (an exact oracle)."""
    if not (impl == "reference" and isinstance(x, Tensor) and x.dtype == torch.float64):
        _checks.check_float_tensor("x", x)


def _check_coupling(x, shift, scale, mask, order, impl):
    _check_input(x, impl)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (batch, ...) with at least 2 dims, got {tuple(x.shape)}")
    _checks.check_like("scale", scale, shift, "shift")
    if shift.shape[:1] != x.shape[:1] or shift.device != x.device or shift.dtype != x.dtype:
        raise ValueError(f"shift must have x's batch size ({x.shape[0]}), device ({x.device}) and dtype ({x.dtype}), "
                         f"got shape {tuple(shift.shape)} on {shift.device}, {shift.dtype}")
    if isinstance(mask, Tensor) and mask.dtype == torch.int32:
        if mask.shape != (math.prod(x.shape[1:]),):
            raise ValueError(f"mask given as an index must have shape ({math.prod(x.shape[1:])},), got {tuple(mask.shape)}")
    else:
        _check_mask(mask, tuple(x.shape[1:]))
    if mask.device != x.device:
        raise ValueError(f"mask must be on x's device ({x.device}), got {mask.device}")
    _checks.check_choice("order", order, ORDERS)
    _checks.check_choice("impl", impl, _backend.IMPLS)


def _transformed_count(mask: Tensor, x: Tensor):
    """A bool mask's count of transformed elements per sample, or None where reading it would
    synchronize with a GPU (or under torch.compile)."""
    if mask.device.type != "cpu" or torch.compiler.is_compiling() or mask.dtype != torch.bool:
        return None  # an index is checked by the operator
    return int(reference.expand_mask(mask, x.shape[1:]).sum())


def affine_coupling(x: Tensor, shift: Tensor, scale: Tensor, mask: Tensor, *, scale_fn: str = "exp",
                    eps: Optional[float] = None, clamp: float = 2.0, slope: float = 1e-3, order: str = "affine",
                    inverse: bool = False, impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """(y, logdet): the affine coupling transform y = x * s + t (order="affine") or (x + t) * s
    (order="glow") on the elements `mask` selects, y = x elsewhere; inverse=True inverts it.

    x: (B, ...) float32/float16/bfloat16. mask: bool over x.shape[1:] (checkerboards, any pattern)
    or over channels, x.shape[1]; or the int32 index of `coupling_index` (what modules pass).
    shift, scale: the conditioner's outputs, either of x's shape (values at identity elements are
    ignored: RealNVP's masked form) or holding only the transformed elements of each sample in
    order (nflows' and Glow's split form, e.g. (B, C/2, H, W) for a channel mask). Their rows may
    be strided views (the halves of one conditioner output). scale is unconstrained; s comes from
    scale_fn: "exp", "sigmoid" (sigmoid(u + 2) + eps, nflows' default eps=1e-3, Glow's 0),
    "softplus" (softplus(u) + eps), "tanh" / "atan" (soft clamps to |log s| < clamp: RealNVP and
    FrEIA), "soft_bound" (zuko's, with `slope`). logdet: (B,) float32, the sum of log s over the
    transformed elements (negated for the inverse).
    """
    _check_coupling(x, shift, scale, mask, order, impl)
    param = scale_param(scale_fn, eps, clamp, slope)
    full = shift.shape == x.shape
    count = None if full else _transformed_count(mask, x)
    if count is not None and count != math.prod(shift.shape[1:]):
        raise ValueError(f"shift must hold the {count} elements mask transforms per sample (or have x's shape "
                         f"{tuple(x.shape)}), got shape {tuple(shift.shape)}")
    backend = _backend.resolve_impl(impl, x.device)
    if backend == "reference":
        if mask.dtype != torch.bool:
            mask = (mask >= 0).reshape(x.shape[1:])
        y, logdet = reference.affine_coupling(x, shift, scale, mask, scale_fn, param, order == "glow", inverse)
        return y, logdet
    index = mask if mask.dtype == torch.int32 else coupling_index(mask, x.shape[1:], compact=not full)
    return coupling_op.operator(backend)(x, shift, scale, index, scale_fn, param, order == "glow", inverse)


def actnorm(x: Tensor, log_scale: Tensor, bias: Tensor, *, order: str = "affine", inverse: bool = False,
            impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """(y, logdet): ActNorm's per-channel affine map y = x * exp(log_scale) + bias (order="affine",
    nflows) or (x + bias) * exp(log_scale) (order="glow"), over x (B, C, *spatial); logdet, (B,)
    float32, is spatial size * sum(log_scale) (negated for the inverse)."""
    _check_input(x, impl)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (batch, channels, ...), got {tuple(x.shape)}")
    for name, p in (("log_scale", log_scale), ("bias", bias)):
        if not isinstance(p, Tensor) or p.shape != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},) (one per channel of x), got "
                             f"{tuple(getattr(p, 'shape', ()))}")
        if p.device != x.device:
            raise ValueError(f"{name} must be on x's device ({x.device}), got {p.device}")
        if not p.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {p.dtype}")
    _checks.check_choice("order", order, ORDERS)
    _checks.check_choice("impl", impl, _backend.IMPLS)
    backend = _backend.resolve_impl(impl, x.device)
    if backend == "reference":
        return reference.actnorm(x, log_scale, bias, order == "glow", inverse)
    return actnorm_op.operator(backend)(x, log_scale, bias, order == "glow", inverse)


def lu_weight(lower: Tensor, upper: Tensor, log_diag: Tensor, sign: Tensor, perm: Tensor, *,
              impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """(W, log|det W|) of Glow's LU-parameterized invertible 1x1 convolution, W = P L U (see
    genfast.reference.flows.lu_weight); a layer's logdet is H * W * log|det W| per sample.
    lower, upper: (C, C) float32; log_diag, sign: (C,); perm: (C,) int64, a permutation."""
    n = lower.shape[0] if isinstance(lower, Tensor) and lower.dim() == 2 else -1
    for name, t, shape in (("lower", lower, (n, n)), ("upper", upper, (n, n)), ("log_diag", log_diag, (n,)),
                           ("sign", sign, (n,)), ("perm", perm, (n,))):
        if not isinstance(t, Tensor) or t.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (lower must be square), got "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.device != lower.device:
            raise ValueError(f"{name} must be on lower's device ({lower.device}), got {t.device}")
    if perm.dtype != torch.int64:
        raise TypeError(f"perm must be int64, got {perm.dtype}")
    _checks.check_choice("impl", impl, _backend.IMPLS)
    backend = _backend.resolve_impl(impl, lower.device)
    if backend == "reference":
        return reference.lu_weight(lower, upper, log_diag, sign, perm)
    for name, t in (("lower", lower), ("upper", upper), ("log_diag", log_diag), ("sign", sign)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 for impl={backend!r}, got {t.dtype}")
    return lu_op.operator(backend)(lower, upper, log_diag, sign, perm)

