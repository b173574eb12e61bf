"""torch.ops.genfast.attention_merge and its backward (native, from _C), their Triton forms (custom_ops
with explicit fakes, on every device), and the autograd of the merge by its backward operator. The
states come as lists of tensors, each read where it lies."""

import math
from typing import List, Optional, Tuple

import torch

from .. import _backend

Tensor = torch.Tensor
LISTED = 8  # AttentionMergeStates::kListed


def merge_states(states: List[Tensor], features: bool) -> List[Tensor]:
    """The states as the kernels read them (csrc/attention_merge_args.h's attention_merge_states): one
    layout for all (features contiguous for o), copied contiguous where they differ, and placed where
    places() can name them (anywhere for up to eight states, evenly spaced past that), stacked where
    they are not."""
    first = states[0]
    shared = not features or first.shape[-1] <= 1 or first.stride(-1) == 1
    if not (shared and all(t.stride() == first.stride() for t in states)):
        states = [t.contiguous() for t in states]
    offsets = [t.data_ptr() - states[0].data_ptr() for t in states]
    size = first.element_size()
    spacing = offsets[1] if len(offsets) > 1 else 0
    if any(at % size or (len(states) > LISTED and at != spacing * s) for s, at in enumerate(offsets)):
        states = list(torch.stack(states).unbind(0))
    return states


def places(states: List[Tensor]) -> Tuple[int, ...]:
    """AttentionMergeStates: the first eight states' offsets from state 0's, in elements, and the spacing
    of the later ones."""
    size = states[0].element_size()
    listed = [(t.data_ptr() - states[0].data_ptr()) // size for t in states[:LISTED]]
    listed += [0] * (LISTED - len(listed))
    return tuple(listed) + (listed[1] if len(states) > 1 else 0,)


def _spans_meet(a: Tensor, b: Tensor) -> bool:
    """Whether the memory a and b span (first to last element) meets."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        first = t.data_ptr()
        return first, first + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()

    (a_first, a_end), (b_first, b_end) = span(a), span(b)
    return a_first < b_end and b_first < a_end


def shares_memory(t: Tensor) -> bool:
    """Whether elements of t share memory (an expanded tensor: a stride of 0 along a dim longer than 1),
    which no output may."""
    return any(n > 1 and stride == 0 for n, stride in zip(t.shape, t.stride()))


def _apart(output: Tensor, states: List[Tensor]) -> bool:
    """Whether output is one of the states (that very view: a merge in place, which the kernels allow)
    or apart from them all (csrc/attention_merge_args.h's attention_merge_output_apart)."""
    return all((output.data_ptr() == state.data_ptr() and output.shape == state.shape
                and output.stride() == state.stride()) or not _spans_meet(output, state) for state in states)


def _check_outputs(o, out, out_lse):
    """check_attention_merge_outputs (csrc/attention_merge_args.h) for the Triton op."""
    first = o[0]
    if (out.shape != first.shape or out.dtype != first.dtype or out.device != first.device
            or (out.shape[2] > 1 and out.stride(2) != 1)):
        raise ValueError(f"out must be a {first.dtype} tensor {tuple(first.shape)} on {first.device} with contiguous "
                         f"features, got {out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")
    if out_lse.shape != first.shape[:2] or out_lse.dtype != torch.float32 or out_lse.device != first.device:
        raise ValueError(f"out_lse must be a float32 tensor {tuple(first.shape[:2])} on {first.device}, got "
                         f"{out_lse.dtype} {tuple(out_lse.shape)} on {out_lse.device}")
    if shares_memory(out) or shares_memory(out_lse):
        raise ValueError("out and out_lse must not have elements that share memory (expanded tensors), got strides "
                         f"{out.stride()} and {out_lse.stride()}")


def _check_ln_base(ln_base):
    """check_attention_merge's ln_base check (csrc/attention_merge_args.h) for the Triton ops."""
    if not (math.isfinite(ln_base) and ln_base > 0):
        raise ValueError(f"ln_base (the natural log of lse's base) must be finite and positive, got {ln_base}")


def _fake(o, lse, ln_base=1.0):
    return o[0].new_empty(o[0].shape), lse[0].new_empty(lse[0].shape)


def _backward_fake(grad_out, grad_lse, o, lse, ln_base=1.0):
    return o[0].new_empty((len(o),) + tuple(o[0].shape)), lse[0].new_empty((len(lse),) + tuple(lse[0].shape))


@torch.library.custom_op("genfast::attention_merge_triton", mutates_args=())
def attention_merge_triton(o: List[Tensor], lse: List[Tensor], ln_base: float = 1.0) -> Tuple[Tensor, Tensor]:
    from ..kernels.attention_merge import launch_attention_merge

    _check_ln_base(ln_base)
    out, out_lse = _fake(o, lse)
    if out_lse.numel():
        o, lse = merge_states(o, True), merge_states(lse, False)
        launch_attention_merge(o, lse, (places(o), places(lse)), ln_base, out, out_lse)
    return out, out_lse


@torch.library.custom_op("genfast::attention_merge_out_triton", mutates_args=("out", "out_lse"))
def attention_merge_out_triton(o: List[Tensor], lse: List[Tensor], ln_base: float, out: Tensor,
                               out_lse: Tensor) -> None:
    """run_attention_merge_out (csrc/attention_merge_args.h): where out and out_lse lie when each is one
    of the states or apart from them all (and the two apart), else through new tensors."""
    from ..kernels.attention_merge import launch_attention_merge

    _check_ln_base(ln_base)
    _check_outputs(o, out, out_lse)
    if not out_lse.numel():
        return
    o, lse = merge_states(o, True), merge_states(lse, False)
    fits = all(_apart(t, states) for t in (out, out_lse) for states in (o, lse)) and not _spans_meet(out, out_lse)
    into, into_lse = (out, out_lse) if fits else _fake(o, lse)
    launch_attention_merge(o, lse, (places(o), places(lse)), ln_base, into, into_lse)
    if not fits:
        out.copy_(into)
        out_lse.copy_(into_lse)


@torch.library.custom_op("genfast::attention_merge_backward_triton", mutates_args=())
def attention_merge_backward_triton(grad_out: Tensor, grad_lse: Optional[Tensor], o: List[Tensor],
                                    lse: List[Tensor], ln_base: float = 1.0) -> Tuple[Tensor, Tensor]:
    from ..kernels.attention_merge import launch_attention_merge_backward

    _check_ln_base(ln_base)
    grad_o, grad_lse_states = _backward_fake(grad_out, grad_lse, o, lse)
    if grad_lse_states.numel():
        o, lse = merge_states(o, True), merge_states(lse, False)
        launch_attention_merge_backward(grad_out.contiguous(), None if grad_lse is None else grad_lse.contiguous(), o,
                                        lse, (places(o), places(lse)), ln_base, grad_o, grad_lse_states)
    return grad_o, grad_lse_states


def _setup_context(ctx, inputs, output):
    o, lse, ln_base = inputs
    ctx.states, ctx.ln_base = len(o), ln_base
    ctx.save_for_backward(*o, *lse)


def _make_backward(backward_op):
    def backward(ctx, grad_out, grad_lse):
        saved = ctx.saved_tensors
        o, lse = list(saved[:ctx.states]), list(saved[ctx.states:])
        if grad_out is None:
            grad_out = torch.zeros_like(o[0], memory_format=torch.contiguous_format)
        grad_o, grad_lse_states = backward_op(grad_out, grad_lse, o, lse, ctx.ln_base)
        return list(grad_o.unbind(0)), list(grad_lse_states.unbind(0)), None

    return backward


attention_merge_triton.register_fake(_fake)
attention_merge_out_triton.register_fake(lambda o, lse, ln_base, out, out_lse: None)
attention_merge_backward_triton.register_fake(_backward_fake)
torch.library.register_autograd("genfast::attention_merge_triton", _make_backward(attention_merge_backward_triton),
                                setup_context=_setup_context)
if _backend.native_module() is not None:
    torch.library.register_fake("genfast::attention_merge")(_fake)
    torch.library.register_fake("genfast::attention_merge_backward")(_backward_fake)
    torch.library.register_fake("genfast::attention_merge_out")(lambda o, lse, ln_base, out, out_lse: None)
    torch.library.register_autograd("genfast::attention_merge",
                                    _make_backward(torch.ops.genfast.attention_merge_backward.default),
                                    setup_context=_setup_context)


def operator(impl: str, into: bool = False):
    """The merge operator of a fused backend: the differentiable one, or with `into` the one that
    writes into given outputs (no autograd)."""
    if impl not in ("native", "triton"):
        raise ValueError(f"attention_merge has no operator for impl={impl!r}")
    name = "attention_merge" + ("_out" if into else "") + ("_triton" if impl == "triton" else "")
    return getattr(torch.ops.genfast, name).default
