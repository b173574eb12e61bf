"""The fused normalizing-flow ops (affine coupling, ActNorm, LU 1x1-conv weight) against the
reference, on every backend: forward, inverse, gradients, masks, extremes, opcheck, compile, errors."""

import itertools
import math

import pytest
import torch

import genfast
from genfast import flows
from genfast.reference import flows as reference
from genfast.testing.tolerances import assert_error_ratio
from conftest import devices, fused_impls, skip_unless_supported

SCALE_FNS = reference.SCALE_FNS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mask(kind, sample_shape, generator):
    if kind == "checkerboard":
        h, w = sample_shape[-2:]
        board = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0
        return board.expand(sample_shape).clone()
    if kind == "channels":
        return torch.arange(sample_shape[0]) < sample_shape[0] // 2
    if kind == "alternate":
        return torch.arange(sample_shape[0]) % 2 == 1
    if kind == "all":
        return torch.ones(sample_shape, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(sample_shape, dtype=torch.bool)
    return torch.rand(sample_shape, generator=generator) < 0.4


# (mask kind, sample shape, layout): full = shift of x's shape; split = only the transformed elements.
MASK_CASES = [
    ("checkerboard", (3, 6, 5), "full"),
    ("channels", (4, 5, 3), "split"),
    ("alternate", (9,), "split"),
    ("random", (3, 7, 4), "split"),
    ("random", (37,), "full"),
    ("all", (5, 2), "split"),
    ("none", (6,), "full"),
]


def _coupling_inputs(mask_kind, sample_shape, layout, batch=5, dtype=torch.float32, device="cpu", u_scale=1.0,
                     seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = _mask(mask_kind, sample_shape, g)
    x = torch.randn((batch,) + sample_shape, generator=g)
    if layout == "full":
        shift, scale = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g) * u_scale
    else:
        count = int(reference.expand_mask(mask, sample_shape).sum())
        # The two halves of one conditioner output: strided rows, as nflows passes them.
        params = torch.randn(batch, 2 * count, generator=g)
        channel_mask = mask.dim() == 1 and len(sample_shape) > 1
        split_shape = (batch, int(mask.sum())) + sample_shape[1:] if channel_mask else (batch, count)
        shift = params[:, :count].reshape(split_shape)
        scale = (params[:, count:] * u_scale).reshape(split_shape)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(shift), cast(scale), mask.to(device)


def _param(scale_fn):
    return flows.scale_param(scale_fn)


def _reference(x, shift, scale, mask, scale_fn, glow, inverse, dtype=torch.float64):
    return reference.affine_coupling(x.to(dtype), shift.to(dtype), scale.to(dtype), mask, scale_fn,
                                     _param(scale_fn), glow, inverse)


def _coupling_grads(fn, x, shift, scale, grad_y, grad_logdet):
    leaves = [t.detach().requires_grad_() for t in (x, shift, scale)]
    y, logdet = fn(*leaves)
    loss = (y.double() * grad_y).sum() + (logdet.double() * grad_logdet).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("glow,inverse", list(itertools.product([False, True], [False, True])))
def test_reference_gradcheck(scale_fn, glow, inverse):
    x, shift, scale, mask = _coupling_inputs("random", (3, 4), "split", batch=3, dtype=torch.float64)
    if scale_fn in ("sigmoid", "softplus"):
        fn_param = 1e-3
    else:
        fn_param = _param(scale_fn)
    torch.autograd.gradcheck(
        lambda a, b, c: reference.affine_coupling(a, b, c, mask, scale_fn, fn_param, glow, inverse),
        [t.requires_grad_() for t in (x, shift, scale)])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("glow,inverse", list(itertools.product([False, True], [False, True])))
def test_coupling_matches_reference(glow, inverse, scale_fn, dtype, impl, device):
    skip_unless_supported(impl, device, dtype)
    for case in MASK_CASES:
        x, shift, scale, mask = _coupling_inputs(*case, dtype=dtype, device=device)
        kwargs = dict(scale_fn=scale_fn, order="glow" if glow else "affine", inverse=inverse)
        y, logdet = flows.affine_coupling(x, shift, scale, mask, impl=impl, **kwargs)
        assert y.dtype == dtype and logdet.dtype == torch.float32 and logdet.shape == (x.shape[0],)
        exact = _reference(x, shift, scale, mask, scale_fn, glow, inverse)
        low = _reference(x, shift, scale, mask, scale_fn, glow, inverse, dtype=dtype)
        assert_error_ratio(y, exact[0], low[0], msg=f"y {case}")
        assert_error_ratio(logdet, exact[1], low[1], msg=f"logdet {case}")

        g = torch.Generator().manual_seed(1)
        # Gradients that y's and logdet's dtypes hold exactly, as test_actnorm_matches_reference's.
        grad_y = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).double()
        grad_logdet = torch.randn(x.shape[0], generator=g, dtype=torch.float64).to(device).float().double()
        got = _coupling_grads(lambda a, b, c: flows.affine_coupling(a, b, c, mask, impl=impl, **kwargs),
                              x, shift, scale, grad_y, grad_logdet)
        exact_g = _coupling_grads(lambda a, b, c: _reference(a, b, c, mask, scale_fn, glow, inverse),
                                  x, shift, scale, grad_y, grad_logdet)
        low_g = _coupling_grads(lambda a, b, c: _reference(a, b, c, mask, scale_fn, glow, inverse, dtype),
                                x, shift, scale, grad_y, grad_logdet)
        for name, a, e, lo in zip(("x", "shift", "scale"), got, exact_g, low_g):
            assert a.shape == e.shape
            assert_error_ratio(a, e, lo, ratio=3.0, msg=f"grad {name} {case}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("scale_fn", SCALE_FNS)
def test_inverse_round_trips(scale_fn, impl, device):
    skip_unless_supported(impl, device)
    x, shift, scale, mask = _coupling_inputs("channels", (4, 3, 3), "split", device=device)
    for order in ("affine", "glow"):
        y, logdet = flows.affine_coupling(x, shift, scale, mask, scale_fn=scale_fn, order=order, impl=impl)
        back, inv_logdet = flows.affine_coupling(y, shift, scale, mask, scale_fn=scale_fn, order=order, inverse=True,
                                                 impl=impl)
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inv_logdet, -logdet)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("scale_fn", SCALE_FNS)
def test_extreme_scales_stay_finite_where_the_source_does(scale_fn, impl, device):
    skip_unless_supported(impl, device)
    x, shift, _, mask = _coupling_inputs("alternate", (8,), "split", batch=4, device=device)
    u = torch.tensor([-1e4, -200.0, -60.0, 60.0], device=device)[:, None].expand(shift.shape).contiguous()
    if scale_fn == "exp":  # exp overflows past 88 in its source too
        u = u.clamp(-80, 80)
    for inverse in (False, True):
        y, logdet = flows.affine_coupling(x, shift, u, mask, scale_fn=scale_fn, inverse=inverse, impl=impl)
        exact = _reference(x, shift, u, mask, scale_fn, False, inverse)
        source = _reference(x, shift, u, mask, scale_fn, False, inverse, dtype=torch.float32)
        for got, want, src in zip((y, logdet), exact, source):
            # Finite wherever the source (float32) is finite; equal to the exact values there.
            finite = torch.isfinite(src)
            assert bool(torch.isfinite(got)[finite].all()), f"{scale_fn}: non-finite where the source is finite"
            torch.testing.assert_close(got.double()[finite], want[finite], rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_nan_propagates(impl, device):
    skip_unless_supported(impl, device)
    x, shift, scale, mask = _coupling_inputs("alternate", (6,), "split", batch=3, device=device)
    x[0, 1] = float("nan")   # a transformed element
    x[1, 0] = float("nan")   # an identity element
    scale[2, 0] = float("nan")
    y, logdet = flows.affine_coupling(x, shift, scale, mask, impl=impl)
    assert y[0, 1].isnan() and y[1, 0].isnan() and y[2, 1].isnan()
    assert not logdet[0].isnan() and logdet[2].isnan()
    assert int(y.isnan().sum()) == 3


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_non_contiguous_large_and_empty(impl, device):
    skip_unless_supported(impl, device)
    # x transposed (non-contiguous), rows past one logdet chunk of 2^14 elements
    x = torch.randn(40000, 3, device=device).t()
    mask = torch.rand(40000, device=device) < 0.5
    shift = torch.randn(3, 40000, device=device)
    scale = torch.randn(3, 40000, device=device)[:, ::1]
    y, logdet = flows.affine_coupling(x, shift, scale, mask, scale_fn="tanh", impl=impl)
    exact = _reference(x, shift, scale, mask, "tanh", False, False)
    low = _reference(x, shift, scale, mask, "tanh", False, False, dtype=torch.float32)
    assert_error_ratio(y, exact[0], low[0], msg="y")
    assert_error_ratio(logdet, exact[1], low[1], msg="logdet")
    for batch_shape in ((0, 6), (4, 0)):
        e = torch.randn(batch_shape, device=device)
        m = torch.ones(batch_shape[1], dtype=torch.bool, device=device)
        y, logdet = flows.affine_coupling(e, e, e, m, impl=impl)
        assert y.shape == batch_shape and logdet.shape == (batch_shape[0],)
        assert bool((logdet == 0).all())


def test_bad_input_names_the_argument():
    x = torch.randn(4, 6)
    mask = torch.arange(6) % 2 == 0
    t = torch.randn(4, 3)
    with pytest.raises(ValueError, match="mask"):
        flows.affine_coupling(x, t, t, torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        flows.affine_coupling(x, t, t, mask.float())
    with pytest.raises(ValueError, match="shape of shift"):
        flows.affine_coupling(x, t, torch.randn(4, 2), mask)
    with pytest.raises(ValueError, match="shift must hold the 3 elements"):
        flows.affine_coupling(x, torch.randn(4, 4), torch.randn(4, 4), mask)
    with pytest.raises(ValueError, match="shift must have x's batch size"):
        flows.affine_coupling(x, torch.randn(3, 3), torch.randn(3, 3), mask)
    with pytest.raises(ValueError, match="shift must have x's .*dtype"):
        flows.affine_coupling(x, t.double(), t.double(), mask)
    with pytest.raises(TypeError, match="x must be float32"):
        flows.affine_coupling(x.int(), t, t, mask)
    with pytest.raises(ValueError, match="scale_fn"):
        flows.affine_coupling(x, t, t, mask, scale_fn="relu")
    with pytest.raises(ValueError, match="clamp must be > 0"):
        flows.affine_coupling(x, t, t, mask, scale_fn="tanh", clamp=0.0)
    with pytest.raises(ValueError, match="order"):
        flows.affine_coupling(x, t, t, mask, order="nice")
    if genfast._backend.native_runs_on("cpu"):
        index = flows.coupling_index(mask, (6,), compact=True)
        with pytest.raises(RuntimeError, match="index entries must be -1 or positions"):
            torch.ops.genfast.affine_coupling(x, t[:, :2], t[:, :2], index, "exp", 0.0, False, False)
        with pytest.raises(RuntimeError, match="scale_fn must be"):
            torch.ops.genfast.affine_coupling(x, t, t, index, "relu", 0.0, False, False)


# ActNorm

ACTNORM_SHAPES = [(5, 3), (4, 3, 5, 6), (3, 7, 1, 1), (300, 2, 9), (2, 4, 3, 2, 2)]


def _actnorm_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    log_scale = (torch.randn(shape[1], generator=g) * 0.5).to(device)
    bias = torch.randn(shape[1], generator=g).to(device)
    return x, log_scale, bias


def _actnorm_grads(fn, x, log_scale, bias, grad_y, grad_logdet):
    leaves = [t.detach().requires_grad_() for t in (x, log_scale, bias)]
    y, logdet = fn(*leaves)
    return torch.autograd.grad((y.double() * grad_y).sum() + (logdet.double() * grad_logdet).sum(), leaves)


@pytest.mark.parametrize("glow,inverse", list(itertools.product([False, True], [False, True])))
def test_actnorm_reference_gradcheck(glow, inverse):
    x, ls, b = (t.double().requires_grad_() for t in _actnorm_inputs((3, 2, 2, 2), torch.float64, "cpu"))
    torch.autograd.gradcheck(lambda *a: reference.actnorm(*a, glow, inverse), [x, ls, b])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("glow,inverse", list(itertools.product([False, True], [False, True])))
def test_actnorm_matches_reference(glow, inverse, dtype, impl, device):
    skip_unless_supported(impl, device, dtype)
    for shape in ACTNORM_SHAPES:
        x, ls, b = _actnorm_inputs(shape, dtype, device)
        order = "glow" if glow else "affine"
        y, logdet = flows.actnorm(x, ls, b, order=order, inverse=inverse, impl=impl)
        exact = reference.actnorm(x.double(), ls.double(), b.double(), glow, inverse)
        low = reference.actnorm(x, ls, b, glow, inverse)
        assert y.dtype == dtype and logdet.dtype == torch.float32
        assert_error_ratio(y, exact[0], low[0], msg=f"y {shape}")
        assert_error_ratio(logdet, exact[1], low[1], msg=f"logdet {shape}")
        # Gradients that y's and logdet's dtypes hold exactly: autograd rounds them to those dtypes
        # before the op's backward sees them (and not for the float64 reference), a difference of the
        # op's inputs that a sum over 2700 elements grew past the error ratio on a GPU.
        grad_y = torch.randn(shape, dtype=torch.float64, device=device).to(dtype).double()
        grad_logdet = torch.randn(shape[0], dtype=torch.float64, device=device).float().double()
        got = _actnorm_grads(lambda *a: flows.actnorm(*a, order=order, inverse=inverse, impl=impl), x, ls, b,
                             grad_y, grad_logdet)
        exact_g = _actnorm_grads(lambda a, c, d: reference.actnorm(a.double(), c.double(), d.double(), glow, inverse),
                                 x, ls, b, grad_y, grad_logdet)
        low_g = _actnorm_grads(lambda *a: reference.actnorm(*a, glow, inverse), x, ls, b, grad_y, grad_logdet)
        for name, a, e, lo in zip(("x", "log_scale", "bias"), got, exact_g, low_g):
            assert_error_ratio(a, e, lo, ratio=3.0, floor=1e-5, msg=f"grad {name} {shape}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_actnorm_empty_and_bad_input(impl, device):
    skip_unless_supported(impl, device)
    x, ls, b = _actnorm_inputs((0, 3, 2), torch.float32, device)
    y, logdet = flows.actnorm(x, ls, b, impl=impl)
    assert y.shape == x.shape and logdet.shape == (0,)
    with pytest.raises(ValueError, match="log_scale must have shape"):
        flows.actnorm(torch.randn(2, 4, device=device), ls, b, impl=impl)
    with pytest.raises(ValueError, match="x must have shape"):
        flows.actnorm(torch.randn(3, device=device), ls, b, impl=impl)


# LU-parameterized weight of the invertible 1x1 convolution

def _lu_inputs(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lower, upper = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    log_diag = torch.randn(n, generator=g) * 0.3
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    perm = torch.randperm(n, generator=g)
    return [t.to(device) for t in (lower, upper, log_diag, sign, perm)]


def test_lu_reference_gradcheck_and_determinant():
    lower, upper, log_diag, sign, perm = _lu_inputs(5, "cpu")
    params = [t.double().requires_grad_() for t in (lower, upper, log_diag)]
    torch.autograd.gradcheck(lambda *a: reference.lu_weight(*a, sign.double(), perm), params)
    weight, logabsdet = reference.lu_weight(*params, sign.double(), perm)
    torch.testing.assert_close(torch.linalg.slogdet(weight).logabsdet, logabsdet)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("n", [1, 3, 17, 48])
def test_lu_weight_matches_reference(n, impl, device):
    skip_unless_supported(impl, device)
    lower, upper, log_diag, sign, perm = _lu_inputs(n, device)
    params = [t.clone().requires_grad_() for t in (lower, upper, log_diag)]
    weight, logabsdet = flows.lu_weight(*params, sign, perm, impl=impl)
    exact_params = [t.detach().double().requires_grad_() for t in params]
    exact = reference.lu_weight(*exact_params, sign.double(), perm)
    low_params = [t.detach().clone().requires_grad_() for t in params]
    low = reference.lu_weight(*low_params, sign, perm)
    assert_error_ratio(weight, exact[0], low[0], msg="weight")
    assert_error_ratio(logabsdet, exact[1], low[1], msg="logabsdet")
    grad_w = torch.randn(n, n, dtype=torch.float64, device=device)

    def grads(ps, out):
        return torch.autograd.grad((out[0].double() * grad_w).sum() + 0.7 * out[1].double(), ps)

    for name, a, e, lo in zip(("lower", "upper", "log_diag"), grads(params, (weight, logabsdet)),
                              grads(exact_params, exact), grads(low_params, low)):
        assert_error_ratio(a, e, lo, ratio=3.0, floor=1e-5, msg=f"grad {name}")


def test_lu_bad_input():
    lower, upper, log_diag, sign, perm = _lu_inputs(4, "cpu")
    with pytest.raises(ValueError, match="upper must have shape"):
        flows.lu_weight(lower, upper[:3], log_diag, sign, perm)
    with pytest.raises(TypeError, match="perm must be int64"):
        flows.lu_weight(lower, upper, log_diag, sign, perm.int())
    if genfast._backend.native_runs_on("cpu"):
        with pytest.raises(RuntimeError, match="perm must be a permutation"):
            flows.lu_weight(lower, upper, log_diag, sign, torch.zeros(4, dtype=torch.int64), impl="native")


# Operator registration: opcheck and torch.compile

def _op_samples(device):
    x, shift, scale, mask = _coupling_inputs("channels", (4, 3, 2), "split", batch=3, device=device)
    index = flows.coupling_index(mask, x.shape[1:], compact=True)
    coupling = (x, shift.contiguous(), scale.contiguous(), index, "sigmoid", 1e-3, True, False)
    xa, ls, b = _actnorm_inputs((3, 4, 2, 2), torch.float32, device)
    lower, upper, log_diag, sign, perm = _lu_inputs(5, device)
    return {
        "affine_coupling": coupling,
        "affine_coupling_backward": (torch.randn_like(x), torch.randn(3, device=device)) + coupling[:7] + (False,),
        "actnorm": (xa, ls, b, False, True),
        "actnorm_backward": (torch.randn_like(xa), torch.randn(3, device=device), xa, ls, b, True, False),
        "lu_weight": (lower, upper, log_diag, sign, perm),
        "lu_weight_backward": (torch.randn(5, 5, device=device), torch.tensor(0.3, device=device), lower, upper,
                               log_diag, sign, perm),
    }


def _requires_grad(args):
    return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("name", ["affine_coupling", "affine_coupling_backward", "actnorm", "actnorm_backward",
                                  "lu_weight", "lu_weight_backward"])
def test_opcheck(name, impl, device):
    skip_unless_supported(impl, device)
    op = getattr(torch.ops.genfast, name if impl == "native" else name + "_triton")
    args = _op_samples(device)[name]
    if not name.endswith("backward"):
        args = _requires_grad(args)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_compile_fullgraph(impl, device):
    skip_unless_supported(impl, device)
    x, shift, scale, mask = _coupling_inputs("channels", (4, 3, 2), "split", batch=3, device=device)
    index = flows.coupling_index(mask, x.shape[1:], compact=True)
    xa, ls, b = _actnorm_inputs((3, 4, 2, 2), torch.float32, device)
    lower, upper, log_diag, sign, perm = _lu_inputs(4, device)

    def layer(x, shift, scale, xa, ls, b, lower, upper, log_diag):
        y, ld1 = flows.affine_coupling(x, shift, scale, index, scale_fn="sigmoid", order="glow", impl=impl)
        z, ld2 = flows.actnorm(xa, ls, b, impl=impl)
        w, ld3 = flows.lu_weight(lower, upper, log_diag, sign, perm, impl=impl)
        return y, z, w, ld1 + ld2 + ld3

    args = (x, shift, scale, xa, ls, b, lower, upper, log_diag)
    eager = layer(*args)
    compiled = torch.compile(layer, fullgraph=True)(*args)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e)
    leaves = _requires_grad(args)
    torch.compile(layer, fullgraph=True)(*leaves)[3].sum().backward()
    assert all(t.grad is not None for t in leaves)
