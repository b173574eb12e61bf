"""NADE and MADE on binarized digits: test log-likelihoods well below the independent-pixel model's,
samples whose pixel marginals match the data's, conditional completion, the autoregressive
structure, and fused models training like reference models."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

import genfast
from genfast.models import MADE, NADE
from genfast.models.data import binarized_digits, train_test_split
from genfast.reference.nade import made_degrees, made_masks, masked_linear
from conftest import fused_impls, skip_unless_runs

pytestmark = pytest.mark.usefixtures("one_thread")  # small batches run faster on one thread

pytest.importorskip("sklearn")

DIMS = 64
NADE_HIDDEN = 64
MADE_HIDDEN = [256]
STEPS = 300
NUM_SAMPLES = 2000
# Sigmoid NADE's training is not chaotic here: native and reference losses stay within 2.2e-7
# (relative) over 400 steps, so the whole run is compared. ReLU is not smooth: after ~180 steps a
# pre-activation within rounding of 0 takes the other branch of the derivative and the runs part
# (7e-4 by step 300), so ReLU runs are compared over their first steps. MADE (ReLU MLP) likewise:
# native within 2.3e-7 of the reference for 270 steps, then 2.3e-5 by step 300; compared over 60.
COMPARED_STEPS_RELU = 60
COMPARED_STEPS_MADE = 60
# The Triton interpreter runs each kernel launch in Python: a few steps on a small batch.
INTERPRETED_STEPS = 4
INTERPRETED_BATCH = 8


@pytest.fixture(scope="module")
def data():
    x = binarized_digits()
    train, test = train_test_split(x)
    return SimpleNamespace(all=x, train=train, test=test)


def _independent_nll(train, test):
    """The NLL of test under independent Bernoulli pixels fit to train: 24.6 nats."""
    p = train.mean(0).clamp(1e-3, 1 - 1e-3)
    return -(test * p.log() + (1 - test) * (1 - p).log()).sum(1).mean().item()


def _nll(model, x):
    with torch.no_grad():
        return -model.log_prob(x).mean().item()


def _marginal_error(samples, data):
    """Mean over pixels of |mean of the samples - mean of the data|."""
    return (samples.mean(0) - data.mean(0)).abs().mean().item()


def _train(model, train, **kwargs):
    initial = copy.deepcopy(model)
    losses = model.fit(train, steps=STEPS, **kwargs)
    return SimpleNamespace(model=model, initial=initial, losses=losses)


@pytest.fixture(scope="module")
def nade(data):
    return _train(NADE(DIMS, NADE_HIDDEN, generator=torch.Generator().manual_seed(0), impl="reference"), data.train)


@pytest.fixture(scope="module")
def made(data):
    torch.manual_seed(0)
    return _train(MADE(DIMS, MADE_HIDDEN, impl="reference"), data.train)


def test_binarized_digits():
    x = binarized_digits()
    train, test = train_test_split(x)
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert train.shape == (1500, 64) and test.shape == (297, 64)
    assert torch.equal(test, x[-297:])
    assert 0.3 < x.mean().item() < 0.35


@pytest.mark.parametrize("name", ["nade", "made"])
def test_training_beats_the_independent_pixel_model(request, data, name):
    run = request.getfixturevalue(name)
    nll = _nll(run.model, data.test)  # NADE 18.1, MADE 18.0 nats after 300 steps
    independent = _independent_nll(data.train, data.test)
    uniform = DIMS * math.log(2)  # 44.4 nats
    assert 24 < independent < 25.5
    assert abs(_nll(run.initial, data.test) - uniform) < 2
    assert nll < 35
    assert nll < independent - 4
    assert sum(run.losses[-20:]) / 20 < run.losses[0] - 20


@pytest.mark.parametrize("name", ["nade", "made"])
def test_sample_marginals_approach_the_data(request, data, name):
    run = request.getfixturevalue(name)
    model, initial = copy.deepcopy(run.model), copy.deepcopy(run.initial)
    model.impl = initial.impl = "auto"
    samples = model.sample(NUM_SAMPLES, genfast.PhiloxGenerator(1))
    untrained = initial.sample(NUM_SAMPLES, genfast.PhiloxGenerator(1))
    assert samples.shape == (NUM_SAMPLES, DIMS) and set(samples.unique().tolist()) <= {0.0, 1.0}
    error = _marginal_error(samples, data.train)  # NADE 0.018, MADE 0.023; about 0.007 from sampling alone
    before = _marginal_error(untrained, data.train)  # about 0.29
    assert error < 0.04
    assert before > 0.2
    assert error < 0.15 * before
    torch.testing.assert_close(model.sample(64, genfast.PhiloxGenerator(1)), samples[:64], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["nade", "made"])
def test_samples_follow_their_own_conditionals(request, name):
    """Given the uniforms u, x_d = [u_d < sigmoid(logit_d(x))] with the logits of the final sample,
    since logit d sees only the dimensions sampled before d."""
    model = request.getfixturevalue(name).model
    u = torch.rand(256, DIMS, generator=torch.Generator().manual_seed(2))
    x = model.sample(256, uniforms=u)
    with torch.no_grad():
        p = torch.sigmoid(model(x))
    clear = (u - p).abs() > 1e-5  # no rounding ties
    assert torch.equal(x[clear], (u < p).float()[clear])
    assert clear.float().mean() > 0.99


@pytest.mark.parametrize("name", ["nade", "made"])
def test_conditional_completion_keeps_the_observed_half(request, data, name):
    model = request.getfixturevalue(name).model
    observed, half = data.test.repeat(4, 1), DIMS // 2
    generator = genfast.PhiloxGenerator(3)
    completed = model.sample(observed.shape[0], generator, observed=observed, num_observed=half)
    unconditional = model.sample(observed.shape[0], generator)
    assert torch.equal(completed[:, :half], observed[:, :half])
    # the lower half completed from the upper one is closer to the truth than a fresh sample's
    # (of 38016 pixels: a standard error of 0.002 on each rate)
    wrong = (completed[:, half:] != observed[:, half:]).float().mean().item()
    wrong_unconditional = (unconditional[:, half:] != observed[:, half:]).float().mean().item()
    assert wrong < 0.85 * wrong_unconditional


def test_nade_orderings(nade, data):
    """One ordering for all, or one per sample (order-agnostic), fused as the reference."""
    model = copy.deepcopy(nade.model)
    x = data.test[:32]
    g = torch.Generator().manual_seed(4)
    shared, per_sample = torch.randperm(DIMS, generator=g), torch.rand(32, DIMS, generator=g).argsort(1)
    expected = [model.log_prob(x, order).detach() for order in (shared, per_sample)]
    model.impl = "auto"
    for order, ref in zip((shared, per_sample), expected):
        torch.testing.assert_close(model.log_prob(x, order).detach(), ref, rtol=1e-5, atol=1e-4)
    # a model trained in one ordering is worse in others
    assert (-expected[1].mean()) > (-model.log_prob(x).mean()) + 3


def test_order_agnostic_training(data):
    model = NADE(DIMS, NADE_HIDDEN, generator=torch.Generator().manual_seed(0))
    losses = model.fit(data.train, steps=150, order_agnostic=True)
    orders = torch.rand(data.test.shape[0], DIMS, generator=torch.Generator().manual_seed(5)).argsort(1)
    with torch.no_grad():
        nll_random_orders = -model.log_prob(data.test, orders).mean().item()
    assert nll_random_orders < _independent_nll(data.train, data.test)  # 20.6 nats
    assert sum(losses[-20:]) / 20 < losses[0] - 20


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_fused_nade_trains_like_the_reference(nade, data, activation):
    skip_unless_runs("native", "cpu")
    if activation == "sigmoid":
        reference, steps = copy.deepcopy(nade.initial), STEPS
        reference_losses = nade.losses
    else:
        reference = NADE(DIMS, NADE_HIDDEN, activation="relu", generator=torch.Generator().manual_seed(0),
                         impl="reference")
        # c = 0 starts every sample's first steps exactly at ReLU's kink (test_native_relu_nade_at_the_kink).
        steps = COMPARED_STEPS_RELU
    fused = copy.deepcopy(reference)
    fused.impl = "native"
    if activation == "relu":
        reference_losses = reference.fit(data.train, steps=steps)
    losses = fused.fit(data.train, steps=steps)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses[:steps]), rtol=1e-5, atol=0)
    if activation == "sigmoid":
        assert abs(_nll(fused, data.test) - _nll(nade.model, data.test)) < 1e-3


def test_native_relu_nade_at_the_kink(data):
    """c = 0 and leading zero pixels put ReLU's pre-activations exactly at the kink for the first
    steps; the fused backward must see them there, as the forward did."""
    skip_unless_runs("native", "cpu")
    model = NADE(DIMS, NADE_HIDDEN, activation="relu", generator=torch.Generator().manual_seed(0), impl="native")
    x = data.train[:100]
    grads = {}
    for impl in ("native", "reference"):
        model.impl = impl
        grads[impl] = torch.autograd.grad(model.loss(x), [model.c])[0]
    torch.testing.assert_close(grads["native"], grads["reference"], rtol=1e-4, atol=1e-6)


@pytest.mark.triton
def test_triton_nade_trains_like_the_reference(nade, data):
    kwargs = dict(steps=INTERPRETED_STEPS, batch_size=INTERPRETED_BATCH)
    reference, fused = copy.deepcopy(nade.initial), copy.deepcopy(nade.initial)
    fused.impl = "triton"
    reference_losses = reference.fit(data.train, **kwargs)
    losses = fused.fit(data.train, **kwargs)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=0)


# MADE


def test_made_is_the_masked_mlp_of_made_degrees(made, data):
    """The logits are the reference masked_linear MLP with made_masks(made_degrees(...)) and the
    layers' weights, and logit d depends on the inputs before d in the ordering only."""
    order = torch.randperm(DIMS, generator=torch.Generator().manual_seed(6))
    model = MADE(DIMS, [96, 80], ordering=order)
    masks = made_masks(made_degrees(DIMS, [96, 80], order))
    x = data.test[:16]
    h = x
    for i, (layer, mask) in enumerate(zip(model.layers, masks)):
        h = masked_linear(h, layer.weight, mask, layer.bias)
        h = torch.relu(h) if i < len(masks) - 1 else h
    torch.testing.assert_close(model(x), h, rtol=1e-5, atol=1e-5)

    jacobian = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], x[0])  # (D out, D in)
    position = torch.empty(DIMS, dtype=torch.int64)
    position[order] = torch.arange(DIMS)
    later_or_same = position[None, :] >= position[:, None]  # input j not before output d
    assert torch.all(jacobian[later_or_same] == 0)
    assert (jacobian[~later_or_same] != 0).float().mean() > 0.5
    assert torch.equal(model.sample(4, uniforms=torch.full((4, DIMS), 0.5))[:, order[0]],
                       (torch.sigmoid(model.layers[-1].bias[order[0]]) > 0.5).float().expand(4))


@pytest.mark.parametrize("impl", fused_impls())
def test_fused_made_trains_like_the_reference(made, data, impl):
    skip_unless_runs(impl, "cpu")
    fused = copy.deepcopy(made.initial)
    fused.impl = impl
    assert all(layer.impl == impl for layer in fused.layers)
    if impl == "triton":  # interpreted
        kwargs = dict(steps=INTERPRETED_STEPS, batch_size=INTERPRETED_BATCH)
        reference_losses = copy.deepcopy(made.initial).fit(data.train, **kwargs)
    else:
        kwargs = dict(steps=COMPARED_STEPS_MADE)
        reference_losses = made.losses[:COMPARED_STEPS_MADE]
    losses = fused.fit(data.train, **kwargs)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=0)


def test_made_sample_propagates_nan():
    """A NaN logit gives a NaN sample dimension (not 0), and the dimensions after it in the ordering
    see it."""
    model = MADE(4, [8], ordering=torch.tensor([2, 0, 3, 1]), impl="reference")
    with torch.no_grad():
        model.layers[-1].bias[0] = float("nan")
    x = model.sample(3, torch.Generator().manual_seed(0))
    assert x[:, 0].isnan().all() and not x[:, 2].isnan().any()
    assert x[:, [3, 1]].isnan().all()


def test_made_sample_walks_a_loaded_ordering():
    """sample() walks the ordering of a loaded state dict (its masks come with it), not the one the
    module was built with."""
    trained = MADE(5, [16], ordering=torch.tensor([4, 2, 0, 3, 1]), impl="reference")
    loaded = MADE(5, [16], impl="reference")
    loaded.load_state_dict(trained.state_dict())
    u = torch.rand(64, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.sample(64, uniforms=u), trained.sample(64, uniforms=u), rtol=0, atol=0)
