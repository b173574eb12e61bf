"""Rotary position embedding (RoPE) in one pass, with its backward: the turn that Llama, GPT-NeoX,
GPT-J and most transformers since apply to queries and keys before attention, fused instead of
the half-dozen elementwise ops (and their saved tensors) of the usual rotate_half form.
genfast.reference.rotary defines it."""

from typing import Optional

import torch

from . import _backend, _checks
from .ops import rotary as rotary_op
from .reference import rotary as reference

Tensor = torch.Tensor


def _check(x, cos, sin, impl):
    if not (impl == "reference" and isinstance(x, Tensor) and x.dtype == torch.float64):
        _checks.check_float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, heads, head_dim), got {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-d tensor (positions, rotary_dim / 2), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got {t.dtype}, "
                             f"{t.device}")
    if sin.shape != cos.shape or 2 * cos.shape[1] > x.shape[3]:
        raise ValueError(f"cos and sin must be (positions, rotary_dim / 2) with rotary_dim <= head_dim "
                         f"({x.shape[3]}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rotary has no gradient for cos and sin: pass tables that do not require grad "
                         "(detach them)")


def _positions(positions, x):
    """positions as (batch, seqlen), broadcast (stride 0) where they have fewer rows; int32 or int64."""
    batch, seqlen = x.shape[:2]
    if positions is None:
        return torch.arange(seqlen, dtype=torch.int32, device=x.device).expand(batch, seqlen)
    if not isinstance(positions, Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be an int32 or int64 tensor, got "
                        f"{getattr(positions, 'dtype', type(positions).__name__)}")
    if positions.device != x.device:
        raise ValueError(f"positions must be on x's device ({x.device}), got {positions.device}")
    try:
        expanded = positions.expand(batch, seqlen)
    except RuntimeError:
        raise ValueError(f"positions must broadcast to (batch, seqlen) = ({batch}, {seqlen}), got "
                         f"{tuple(positions.shape)}") from None
    return expanded


def _check_range(positions, cos):
    """On the CPU, for the backends that do not check it themselves (the native op does), and for
    int64 positions before they are narrowed to int32."""
    if positions.device.type == "cpu" and positions.numel() > 0 and not torch.compiler.is_compiling():
        low, high = (int(t) for t in torch.aminmax(positions))
        if low < 0 or high >= cos.shape[0]:
            raise ValueError(f"positions must lie in 0 .. {cos.shape[0] - 1} (the rows of cos and sin), got "
                             f"{low} .. {high}")


def rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor] = None, *, interleaved: bool = False,
           inverse: bool = False, inplace: bool = False, impl: str = "auto") -> Tensor:
    """x (batch, seqlen, heads, head_dim), any strides, turned by the rotary embedding: token (b, i)
    at position positions[b, i] (integer, broadcastable to (batch, seqlen); default i), whose angles
    are that row of cos and sin (positions, rotary_dim / 2; x's dtype). Plane m is features (2m,
    2m + 1) (interleaved, GPT-J) or (m, m + rotary_dim / 2) (GPT-NeoX, Llama); features from
    rotary_dim on pass unchanged. inverse negates sin (the transpose; for rotation tables, the turn
    back). Returns a tensor of x's layout, or x turned in place (inplace). Differentiable in x (the
    backward is the inverse), in place too; cos and sin get no gradient. The CPU checks that the
    positions have rows in the tables; a GPU does not (that would synchronise), and turns a
    position outside them by nothing, as FlashAttention does."""
    _check(x, cos, sin, impl)
    if inplace and not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(x) == 1:
        raise ValueError("x must not overlap itself to be turned in place (an expanded tensor): pass "
                         "x.contiguous(), or inplace=False")
    backend = _backend.resolve_impl(impl, x.device)
    positions = _positions(positions, x)
    if backend != "native" or positions.dtype != torch.int32:
        _check_range(positions, cos)
    if positions.dtype != torch.int32:  # narrowed past the tables' ends, so that no position wraps into them
        positions = positions.clamp(-1, cos.shape[0]).to(torch.int32)
    if backend == "reference":
        turned = reference.rotary(x, cos, sin, positions, interleaved, inverse)
        return x.copy_(turned) if inplace else turned
    if inplace and torch.is_grad_enabled() and x.requires_grad:
        # autograd tracks the copy; the in-place operator has no backward
        return x.copy_(rotary_op.operator(backend, False)(x, cos, sin, positions, bool(interleaved), bool(inverse)))
    if inplace:
        rotary_op.operator(backend, True)(x, cos, sin, positions, bool(interleaved), bool(inverse))
        return x
    return rotary_op.operator(backend, False)(x, cos, sin, positions, bool(interleaved), bool(inverse))
