"""Binary NADE's fused conditionals, log-likelihood and sampling against the reference, on every
backend: values, gradients, orderings, the Philox stream, sampling statistics against exact
enumeration, opcheck, torch.compile and bad input."""

import itertools

import pytest
import torch

import genfast
from genfast.reference import nade
from genfast.reference.random import philox_uniform
from genfast.testing.tolerances import assert_error_ratio
from conftest import devices, fused_impls, skip_unless_runs, skip_unless_supported

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ORDERINGS = ["natural", "shared", "per_sample"]


def _inputs(batch, dims, hidden, ordering, dtype, device, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, dims, generator=g) < 0.5).to(dtype)
    W = torch.randn(hidden, dims, generator=g) * scale
    c = torch.randn(hidden, generator=g) * scale
    V = torch.randn(dims, hidden, generator=g) * scale
    b = torch.randn(dims, generator=g) * scale
    order = None
    if ordering == "shared":
        order = torch.randperm(dims, generator=g)
    elif ordering == "per_sample":
        order = torch.stack([torch.randperm(dims, generator=g) for _ in range(batch)])
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(W.to(dtype)), move(c.to(dtype)), move(V.to(dtype)), move(b.to(dtype)), move(order)


def _double(*tensors):
    return tuple(t.double() for t in tensors)


# Conditionals and their gradients

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", nade.ACTIVATIONS)
@pytest.mark.parametrize("ordering", ORDERINGS)
@pytest.mark.parametrize("batch,dims,hidden", [(13, 17, 9), (1, 1, 1), (20, 64, 50)])
def test_conditionals_match_reference(batch, dims, hidden, ordering, activation, dtype, impl, device):
    skip_unless_supported(impl, device, dtype)
    x, W, c, V, b, order = _inputs(batch, dims, hidden, ordering, dtype, device)
    got = genfast.nade_conditionals(x, W, c, V, b, order, activation=activation, impl=impl)
    exact = nade.conditionals(*_double(x, W, c, V, b), order, activation)
    low = nade.conditionals(x, W, c, V, b, order, activation)
    assert got.dtype == dtype and got.shape == x.shape
    assert_error_ratio(got, exact, low)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", nade.ACTIVATIONS)
@pytest.mark.parametrize("ordering", ORDERINGS)
@pytest.mark.parametrize("batch,dims,hidden", [(13, 17, 9), (1, 1, 1), (37, 30, 20)])
def test_gradients_match_reference(batch, dims, hidden, ordering, activation, dtype, impl, device):
    skip_unless_supported(impl, device, dtype)
    x, W, c, V, b, order = _inputs(batch, dims, hidden, ordering, dtype, device)
    grad_logits = torch.randn(batch, dims, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)

    def grads(fn, cast, **kw):
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, W, c, V, b)]
        logits = fn(*leaves, order, activation=activation, **kw)
        return torch.autograd.grad((logits.double() * grad_logits).sum(), leaves)

    got = grads(genfast.nade_conditionals, dtype, impl=impl)
    exact = grads(nade.conditionals, torch.float64)
    low = grads(nade.conditionals, dtype)
    for name, a, e, lo in zip(("x", "W", "c", "V", "b"), got, exact, low):
        assert a.shape == e.shape and a.dtype == dtype
        assert_error_ratio(a, e, lo, ratio=3.0, msg=f"grad {name}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_relu_gradients_at_the_kink(impl, device):
    """c = 0 and leading zeros in x keep the first steps' pre-activations exactly at ReLU's kink;
    the backward, recomputing them from the last step, must see them there too."""
    skip_unless_supported(impl, device)
    x, W, c, V, b, order = _inputs(9, 12, 10, "natural", torch.float32, device)
    x[:, :5] = 0
    x[0] = 0  # a sample of zeros only
    c = torch.zeros_like(c)
    leaves = [t.detach().requires_grad_() for t in (W, c, V, b)]
    got = torch.autograd.grad(genfast.nade_log_prob(x, *leaves, activation="relu", impl=impl).sum(), leaves)
    exact_leaves = [t.detach().double().requires_grad_() for t in (W, c, V, b)]
    exact = torch.autograd.grad(nade.log_prob(x.double(), *exact_leaves, activation="relu").sum(), exact_leaves)
    low = torch.autograd.grad(nade.log_prob(x, *leaves, activation="relu").sum(), leaves)
    for name, a, e, lo in zip(("W", "c", "V", "b"), got, exact, low):
        assert_error_ratio(a, e, lo, ratio=3.0, msg=f"grad {name}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_log_prob_and_strided_inputs(impl, device):
    skip_unless_supported(impl, device)
    x, W, c, V, b, order = _inputs(11, 24, 16, "per_sample", torch.float32, device)
    got = genfast.nade_log_prob(x, W, c, V, b, order, impl=impl)
    exact = nade.log_prob(*_double(x, W, c, V, b), order)
    assert got.dtype == torch.float32
    assert_error_ratio(got, exact, nade.log_prob(x, W, c, V, b, order))
    # Strided views: every other column of wider tensors, W given as the transpose of a (D, H).
    wide = torch.stack([x, 1 - x], dim=2).reshape(11, 48)[:, ::2]
    strided = genfast.nade_log_prob(wide, W.t().contiguous().t(), c, V.t().contiguous().t(), b, order, impl=impl)
    torch.testing.assert_close(strided, got)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_nan_propagates(impl, device):
    skip_unless_supported(impl, device)
    x, W, c, V, b, order = _inputs(6, 10, 8, "shared", torch.float32, device)
    V = V.clone()
    V[order[3], 0] = float("nan")  # one conditional's output weights
    logits = genfast.nade_conditionals(x, W, c, V, b, order, impl=impl)
    assert torch.equal(logits.isnan(), nade.conditionals(x, W, c, V, b, order).isnan())
    assert logits.isnan().any() and not logits.isnan().all()
    c = c.clone()
    c[2] = float("nan")  # reaches every conditional through the hidden units, under both activations
    for activation in nade.ACTIVATIONS:
        assert genfast.nade_conditionals(x, W, c, V, b, order, activation=activation, impl=impl).isnan().all()


# Sampling

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("activation", nade.ACTIVATIONS)
@pytest.mark.parametrize("ordering", ORDERINGS)
def test_sample_with_uniforms_matches_reference(ordering, activation, impl, device):
    skip_unless_supported(impl, device)
    batch, dims, hidden = 21, 19, 13
    _, W, c, V, b, order = _inputs(batch, dims, hidden, ordering, torch.float32, device, scale=1.0)
    uniforms = torch.rand(batch, dims, generator=torch.Generator().manual_seed(3)).to(device)
    got = genfast.nade_sample(W, c, V, b, batch, uniforms=uniforms, ordering=order, activation=activation, impl=impl)
    expected = nade.sample(*_double(W, c, V, b), uniforms.double(), order, activation)
    assert got.dtype == torch.float32 and torch.equal(got, expected.float())
    # Each decision agrees with the sample's own float64 conditionals.
    probs = torch.sigmoid(nade.conditionals(got.double(), *_double(W, c, V, b), order, activation))
    assert torch.equal(got.bool(), uniforms.double() < probs)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_philox_stream_is_the_same_on_every_backend(dtype, impl, device):
    skip_unless_supported(impl, device, dtype)
    batch, dims, hidden = 9, 31, 12
    _, W, c, V, b, order = _inputs(batch, dims, hidden, "shared", torch.float32, device, scale=1.0)
    seed, offset = 1234567, 40
    got = genfast.nade_sample(W, c, V, b, batch, generator=genfast.PhiloxGenerator(seed, offset), ordering=order,
                              dtype=dtype, impl=impl)
    uniforms = philox_uniform((batch, dims), seed, offset, torch.float64, device)
    expected = nade.sample(*_double(W, c, V, b), uniforms, order)
    assert got.dtype == dtype and torch.equal(got.double(), expected)
    again = genfast.nade_sample(W, c, V, b, batch, generator=genfast.PhiloxGenerator(seed, offset), ordering=order,
                                dtype=dtype, impl="reference")
    assert torch.equal(got, again)
    # A generator advances: the next call draws fresh uniforms.
    generator = genfast.PhiloxGenerator(seed)
    first = genfast.nade_sample(W, c, V, b, 64, generator=generator, impl=impl)
    assert not torch.equal(first, genfast.nade_sample(W, c, V, b, 64, generator=generator, impl=impl))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("ordering", ["natural", "per_sample"])
def test_conditional_completion(ordering, impl, device):
    skip_unless_supported(impl, device)
    batch, dims, hidden, seen = 15, 12, 10, 5
    x, W, c, V, b, order = _inputs(batch, dims, hidden, ordering, torch.float32, device, scale=1.0)
    uniforms = torch.rand(batch, dims, generator=torch.Generator().manual_seed(4)).to(device)
    got = genfast.nade_sample(W, c, V, b, batch, uniforms=uniforms, ordering=order, observed=x, num_observed=seen,
                              impl=impl)
    expected = nade.sample(*_double(W, c, V, b), uniforms.double(), order, observed=x.double(), num_observed=seen)
    assert torch.equal(got.double(), expected)
    first = (torch.arange(dims, device=device) if order is None else order).expand(batch, dims)[:, :seen]
    assert torch.equal(got.gather(1, first), x.gather(1, first))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_sample_nan_propagates(impl, device):
    skip_unless_supported(impl, device)
    _, W, c, V, b, _ = _inputs(4, 6, 5, "natural", torch.float32, device)
    b = b.clone()
    b[2] = float("nan")
    got = genfast.nade_sample(W, c, V, b, 4, generator=genfast.PhiloxGenerator(0), impl=impl)
    assert not got[:, :2].isnan().any() and got[:, 2:].isnan().all()


def _exact_distribution(W, c, V, b, dims):
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=dims)), dtype=torch.float64)
    return states, nade.log_prob(states, *_double(W, c, V, b)).exp()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_sample_frequencies_match_exact_enumeration(impl, device):
    skip_unless_supported(impl, device)
    dims, hidden = 8 if impl == "native" else 5, 7
    num = 200_000 if impl == "native" else 8_192  # the interpreter runs Triton in Python
    _, W, c, V, b, _ = _inputs(1, dims, hidden, "natural", torch.float32, "cpu", seed=5, scale=1.5)
    states, probs = _exact_distribution(W, c, V, b, dims)
    assert abs(probs.sum().item() - 1) < 1e-12
    samples = genfast.nade_sample(*(t.to(device) for t in (W, c, V, b)), num, generator=genfast.PhiloxGenerator(9),
                                  impl=impl).cpu().double()
    codes = (samples * 2 ** torch.arange(dims - 1, -1, -1, dtype=torch.float64)).sum(1).long()
    frequencies = torch.bincount(codes, minlength=2 ** dims).double() / num
    sigma = (probs * (1 - probs) / num).sqrt()
    assert ((frequencies - probs).abs() <= 5 * sigma + 1e-12).all()
    marginals = (probs[:, None] * states).sum(0)
    margin_sigma = (marginals * (1 - marginals) / num).sqrt()
    assert ((samples.mean(0) - marginals).abs() <= 5 * margin_sigma).all()


# Registration: opcheck and torch.compile

def _op_name(name, impl):
    return getattr(torch.ops.genfast, name if impl == "native" else name + "_triton")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck(impl, device):
    skip_unless_supported(impl, device)
    x, W, c, V, b, order = _inputs(5, 7, 6, "per_sample", torch.float32, device)
    leaves = tuple(t.requires_grad_() for t in (x, W, c, V, b))
    torch.library.opcheck(_op_name("nade_conditionals", impl), (*leaves, order, "relu"))
    plain = tuple(t.detach() for t in leaves)
    torch.library.opcheck(_op_name("nade_conditionals_backward", impl),
                          (torch.randn(5, 7, device=device), *plain, order, "sigmoid"))
    uniforms = torch.rand(5, 7, device=device)
    key = (None, 3, 8) if impl == "native" else (3, 8)
    sample_args = (*plain[1:], 5, torch.float16, uniforms, order, plain[0], 2, "sigmoid", *key)
    torch.library.opcheck(_op_name("nade_sample", impl), sample_args)
    torch.library.opcheck(_op_name("nade_sample", impl), (*plain[1:], 5, torch.float32, None, None, None, 0, "relu",
                                                          *key))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_compile_fullgraph(impl, device):
    skip_unless_supported(impl, device)
    x, W, c, V, b, order = _inputs(6, 9, 5, "per_sample", torch.float32, device)

    def loss(x, W, c, V, b):
        return -genfast.nade_log_prob(x, W, c, V, b, order, impl=impl).mean()

    leaves = [t.detach().requires_grad_() for t in (W, c, V, b)]
    eager = loss(x, *leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(loss, fullgraph=True)(x, *leaves)
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(torch.autograd.grad(compiled, leaves), eager_grads):
        torch.testing.assert_close(a, e)
    uniforms = torch.rand(6, 9, device=device)

    def draw(W, c, V, b, uniforms):
        return genfast.nade_sample(W, c, V, b, 6, uniforms=uniforms, impl=impl)

    torch.testing.assert_close(torch.compile(draw, fullgraph=True)(W, c, V, b, uniforms), draw(W, c, V, b, uniforms))


# Empty and bad input

@pytest.mark.parametrize("impl", ["native", pytest.param("triton", marks=pytest.mark.triton), "reference"])
def test_empty_inputs(impl):
    skip_unless_supported(impl, "cpu")
    x, W, c, V, b, order = _inputs(4, 6, 5, "shared", torch.float32, "cpu")
    assert genfast.nade_conditionals(x[:0], W, c, V, b, impl=impl).shape == (0, 6)
    assert genfast.nade_log_prob(x[:0], W, c, V, b, impl=impl).shape == (0,)
    assert genfast.nade_sample(W, c, V, b, 0, impl=impl).shape == (0, 6)
    empty = genfast.nade_conditionals(x[:, :0], W[:, :0], c, V[:0], b[:0], impl=impl)
    assert empty.shape == (4, 0)
    leaves = [t.requires_grad_() for t in (W.clone(), c.clone(), V.clone(), b.clone())]
    genfast.nade_log_prob(x[:0], *leaves, impl=impl).sum().backward()
    assert all(t.grad is not None and not t.grad.any() for t in leaves)


def test_bad_input_names_the_argument():
    x, W, c, V, b, order = _inputs(4, 6, 5, "shared", torch.float32, "cpu")
    f = genfast.nade_conditionals
    with pytest.raises(ValueError, match="x must be binary"):
        f(x + 0.5, W, c, V, b)
    with pytest.raises(ValueError, match="x must have shape"):
        f(x[0], W, c, V, b)
    with pytest.raises(TypeError, match="x must be float32"):
        f(x.long(), W, c, V, b)
    with pytest.raises(ValueError, match="W must have shape"):
        f(x, W[:, :5], c, V, b)
    with pytest.raises(ValueError, match="V must have shape"):
        f(x, W, c, V[:, :4], b)
    with pytest.raises(ValueError, match="c must have shape"):
        f(x, W, c[:4], V, b)
    with pytest.raises(ValueError, match="b must have shape"):
        f(x, W, c, V, b[:5])
    with pytest.raises(TypeError, match="V must be floating point"):
        f(x, W, c, V.long(), b)
    with pytest.raises(ValueError, match="permutation"):
        f(x, W, c, V, b, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="ordering must have shape"):
        f(x, W, c, V, b, order[:5])
    with pytest.raises(TypeError, match="ordering must be an int64"):
        f(x, W, c, V, b, order.int())
    with pytest.raises(ValueError, match="activation must be one of"):
        f(x, W, c, V, b, activation="tanh")
    with pytest.raises(ValueError, match="impl must be one of"):
        f(x, W, c, V, b, impl="cuda")
    if torch.device("meta") != x.device:
        with pytest.raises(ValueError, match="W must be on the device of x"):
            f(x, W.to("meta"), c, V, b)
    s = genfast.nade_sample
    with pytest.raises(ValueError, match="num_samples must be"):
        s(W, c, V, b, -1)
    with pytest.raises(ValueError, match="uniforms must have shape"):
        s(W, c, V, b, 4, uniforms=torch.rand(4, 5))
    with pytest.raises(ValueError, match="observed must be given"):
        s(W, c, V, b, 4, num_observed=2)
    with pytest.raises(ValueError, match="num_observed must be"):
        s(W, c, V, b, 4, observed=x, num_observed=7)
    with pytest.raises(ValueError, match="observed must be binary"):
        s(W, c, V, b, 4, observed=x + 0.5, num_observed=2)
    with pytest.raises(ValueError, match="ordering must have shape"):
        s(W, c, V, b, 3, ordering=torch.stack([order] * 4))
    with pytest.raises(TypeError, match="dtype must be"):
        s(W, c, V, b, 3, dtype=torch.int32, impl="native" if genfast._backend.native_runs_on("cpu") else "auto")


def test_operators_check_their_input():
    skip_unless_runs("native", "cpu")
    x, W, c, V, b, order = _inputs(4, 6, 5, "shared", torch.float32, "cpu")
    op = torch.ops.genfast.nade_conditionals
    with pytest.raises(RuntimeError, match="x must be binary"):
        op(x + 0.5, W, c, V, b, None, "sigmoid")
    with pytest.raises(RuntimeError, match="V must have shape"):
        op(x, W, c, V[:, :4], b, None, "sigmoid")
    with pytest.raises(RuntimeError, match="permutation"):
        op(x, W, c, V, b, torch.zeros(6, dtype=torch.int64), "sigmoid")
    with pytest.raises(RuntimeError, match="activation must be"):
        op(x, W, c, V, b, None, "tanh")
    sample = torch.ops.genfast.nade_sample
    with pytest.raises(RuntimeError, match="num_observed must be in"):
        sample(W, c, V, b, 4, torch.float32, None, None, x, 9, "sigmoid", None, 0, 0)
    with pytest.raises(RuntimeError, match="observed must be binary"):
        sample(W, c, V, b, 4, torch.float32, None, None, x + 0.5, 3, "sigmoid", None, 0, 0)
    with pytest.raises(RuntimeError, match="uniforms must have shape"):
        sample(W, c, V, b, 4, torch.float32, torch.rand(3, 6), None, None, 0, "sigmoid", None, 0, 0)
    with pytest.raises(RuntimeError, match="dtype must be"):
        sample(W, c, V, b, 4, torch.float64, None, None, None, 0, "sigmoid", None, 0, 0)
