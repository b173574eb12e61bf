"""Binary NADE (Larochelle & Murray 2011) fused: the D conditionals of p(x) = prod_d p(x_d | x_<d),
log p(x), and sampling, each one kernel launch with O(B H) working memory.

x (B, D) in {0, 1}; W (H, D), c (H), V (D, H), b (D). Visiting the dimensions in an ordering o:
a_1 = c;  h_k = act(a_k);  logit[o_k] = b[o_k] + V[o_k] . h_k;  a_{k+1} = a_k + W[:, o_k] x[o_k]
(see genfast.reference.nade). The ordering is none (0, 1, ..., D - 1), one (D,) int64
permutation for every sample, or one per sample (B, D), as order-agnostic training draws them.
act is "sigmoid" (the paper) or "relu". Kernels compute in float32 whatever the dtypes.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from . import _backend, _checks
from .ops import nade_conditionals as conditionals_op
from .ops import nade_sample  # noqa: F401  (registers the sampling operators' fakes)
from .random import as_int64, kernel_noise_key
from .reference import nade as reference
from .reference.random import philox_uniform

Tensor = torch.Tensor


def _check_floating(name, t, anchor, anchor_name):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != anchor.device:
        raise ValueError(f"{name} must be on the device of {anchor_name} ({anchor.device}), got {t.device}")


def _check_params(W, c, V, b, rows, anchor, anchor_name, ordering, activation, impl):
    """Shapes (W (H, D) fixes H and D), devices, the ordering, activation and impl, as the native
    operators check them, so every backend raises the same errors."""
    _check_floating("W", W, anchor, anchor_name)
    if W.dim() != 2:
        raise ValueError(f"W must have shape (H, D), got {tuple(W.shape)}")
    hidden, dims = W.shape
    for name, t, shape in (("c", c, (hidden,)), ("V", V, (dims, hidden)), ("b", b, (dims,))):
        _check_floating(name, t, anchor, anchor_name)
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (W is (H, D) = {(hidden, dims)}), got {tuple(t.shape)}")
    if ordering is not None:
        if not isinstance(ordering, Tensor) or ordering.dtype != torch.int64:
            raise TypeError(f"ordering must be an int64 tensor, got {getattr(ordering, 'dtype', type(ordering).__name__)}")
        if ordering.shape not in ((dims,), (rows, dims)):
            raise ValueError(f"ordering must have shape (D,) = ({dims},) or (batch, D) = ({rows}, {dims}), got "
                             f"{tuple(ordering.shape)}")
        if ordering.device != anchor.device:
            raise ValueError(f"ordering must be on the device of {anchor_name} ({anchor.device}), got {ordering.device}")
        if ordering.device.type == "cpu" and not torch.compiler.is_compiling() and ordering.numel() > 0:
            sorted_rows = ordering.reshape(-1, dims).sort(1).values
            if not torch.equal(sorted_rows, torch.arange(dims).expand_as(sorted_rows)):
                raise ValueError(f"ordering must be a permutation of 0..{dims - 1} (each row, if one per sample)")
    _checks.check_choice("activation", activation, reference.ACTIVATIONS)
    _checks.check_choice("impl", impl, _backend.IMPLS)


def _check_binary(name, t, what="x"):
    """On the CPU in eager mode: a GPU check would synchronize."""
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and t.numel() > 0:
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must be binary (0 or 1){'' if what == 'x' else ' ' + what}")


def _check_x(x, impl):
    if not (impl == "reference" and isinstance(x, Tensor) and x.dtype == torch.float64):
        _checks.check_float_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, D), got {tuple(x.shape)}")


def nade_conditionals(x: Tensor, W: Tensor, c: Tensor, V: Tensor, b: Tensor, ordering: Optional[Tensor] = None, *,
                      activation: str = "sigmoid", impl: str = "auto") -> Tensor:
    """The logits (B, D), in x's dtype, of p(x_d = 1 | the dimensions the ordering visits before d).
    Differentiable in W, c, V, b and x (fused backward kernels that recompute the running
    pre-activations instead of storing B x D x H of them)."""
    _check_x(x, impl)
    if not isinstance(W, Tensor) or W.dim() != 2 or W.shape[1] != x.shape[1]:
        raise ValueError(f"W must have shape (H, D) with D = x.shape[1] = {x.shape[1]}, got "
                         f"{tuple(getattr(W, 'shape', ()))}")
    _check_params(W, c, V, b, x.shape[0], x, "x", ordering, activation, impl)
    _check_binary("x", x)
    backend = _backend.resolve_impl(impl, x.device)
    if backend == "reference":
        return reference.conditionals(x, W, c, V, b, ordering, activation)
    return conditionals_op.operator(backend)(x, W, c, V, b, ordering, activation)


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """sum_d x_d l_d - softplus(l_d), (B,) float32 (float64 for float64 logits): log p(x) under
    independent Bernoullis with log-odds l, stable for any logit."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype)
    return (x.to(dtype) * logits - F.softplus(logits)).sum(1)


def nade_log_prob(x: Tensor, W: Tensor, c: Tensor, V: Tensor, b: Tensor, ordering: Optional[Tensor] = None, *,
                  activation: str = "sigmoid", impl: str = "auto") -> Tensor:
    """log p(x), (B,) float32 (float64 for the float64 reference): sum_d x_d l_d - softplus(l_d)
    over the fused logits l, stable for any logit."""
    return bernoulli_log_prob(x, nade_conditionals(x, W, c, V, b, ordering, activation=activation, impl=impl))


def nade_sample(W: Tensor, c: Tensor, V: Tensor, b: Tensor, num_samples: int, *, generator=None,
                uniforms: Optional[Tensor] = None, ordering: Optional[Tensor] = None,
                observed: Optional[Tensor] = None, num_observed: int = 0, activation: str = "sigmoid",
                dtype: Optional[torch.dtype] = None, impl: str = "auto") -> Tensor:
    """num_samples samples (num_samples, D) of the NADE, the D sequential steps in one kernel
    launch: step k sets x[o_k] = 1 where u < sigmoid(logit[o_k]), else 0.

    u is `uniforms` (num_samples, D) when given (exactly comparable to the reference), else the
    in-kernel Philox stream: element (r, d) is genfast.reference.random.philox_uniform's element
    r * D + d for the key drawn from `generator` (a genfast.PhiloxGenerator gives the same uniforms
    on every backend, so the same samples except where a uniform lies within rounding of its
    probability; a CUDA torch.Generator is read in-kernel, so sampling is CUDA-graph safe).
    Conditional completion: the first num_observed dimensions of the ordering are copied from
    `observed` (num_samples, D) and the rest are sampled given them. dtype: of the samples,
    W's dtype by default (float32 for the fused backends when W is float64)."""
    _check_floating("W", W, W, "W")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
    _check_params(W, c, V, b, num_samples, W, "W", ordering, activation, impl)
    dims = W.shape[1]
    backend = _backend.resolve_impl(impl, W.device)
    if dtype is None:
        dtype = W.dtype if W.dtype in _checks.FLOAT_DTYPES or backend == "reference" else torch.float32
    if backend != "reference" and dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if uniforms is not None:
        _check_floating("uniforms", uniforms, W, "W")
        if uniforms.shape != (num_samples, dims):
            raise ValueError(f"uniforms must have shape (num_samples, D) = {(num_samples, dims)}, got "
                             f"{tuple(uniforms.shape)}")
    if isinstance(num_observed, bool) or not isinstance(num_observed, int) or not 0 <= num_observed <= dims:
        raise ValueError(f"num_observed must be an int in [0, D = {dims}], got {num_observed!r}")
    if num_observed > 0:
        if observed is None:
            raise ValueError("observed must be given when num_observed > 0")
        _check_floating("observed", observed, W, "W")
        if observed.shape != (num_samples, dims):
            raise ValueError(f"observed must have shape (num_samples, D) = {(num_samples, dims)}, got "
                             f"{tuple(observed.shape)}")
        order = torch.arange(dims, device=W.device) if ordering is None else ordering
        _check_binary("observed", observed.gather(1, order.expand(num_samples, dims)[:, :num_observed]),
                      "at the first num_observed dimensions of the ordering")
    W, c, V, b = (t.detach() for t in (W, c, V, b))
    cuda_generator, key = (None, None) if uniforms is not None else kernel_noise_key(generator, W.device, backend)
    seed, offset = key if key is not None else (0, 0)
    if backend == "reference":
        if uniforms is None:
            uniforms = philox_uniform((num_samples, dims), seed, offset, dtype=torch.float64, device=W.device)
        return reference.sample(W, c, V, b, uniforms.to(W.dtype), ordering, activation, observed,
                                num_observed).to(dtype)
    args = (W, c, V, b, num_samples, dtype, uniforms, ordering, observed if num_observed > 0 else None, num_observed,
            activation)
    if backend == "native":
        return torch.ops.genfast.nade_sample(*args, cuda_generator, as_int64(seed), as_int64(offset))
    return torch.ops.genfast.nade_sample_triton(*args, as_int64(seed), as_int64(offset))
