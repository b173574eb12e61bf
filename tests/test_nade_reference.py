"""The NADE reference (genfast.reference.nade): its vectorized O(D H) form against the formula
written as a D-loop, gradients in float64, and sampling against exact enumeration."""

import itertools

import pytest
import torch

from genfast.reference import nade


def _params(dims, hidden, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(hidden, dims, generator=g, dtype=dtype)
    c = torch.randn(hidden, generator=g, dtype=dtype) * 0.5
    V = torch.randn(dims, hidden, generator=g, dtype=dtype) * 0.5
    b = torch.randn(dims, generator=g, dtype=dtype) * 0.5
    return W, c, V, b


def _orderings(kind, batch, dims, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "natural":
        return None
    if kind == "shared":
        return torch.randperm(dims, generator=g)
    return torch.stack([torch.randperm(dims, generator=g) for _ in range(batch)])


@pytest.mark.parametrize("activation", nade.ACTIVATIONS)
@pytest.mark.parametrize("ordering", ["natural", "shared", "per_sample"])
@pytest.mark.parametrize("batch,dims,hidden", [(5, 7, 4), (1, 1, 3), (3, 12, 16)])
def test_vectorized_form_equals_the_loop(batch, dims, hidden, ordering, activation):
    W, c, V, b = _params(dims, hidden)
    x = (torch.rand(batch, dims, generator=torch.Generator().manual_seed(2)) < 0.5).double()
    order = _orderings(ordering, batch, dims)
    expected = nade.conditionals_loop(x, W, c, V, b, order, activation)
    torch.testing.assert_close(nade.conditionals(x, W, c, V, b, order, activation), expected)


def test_log_prob_is_the_sum_of_bernoulli_log_likelihoods():
    W, c, V, b = _params(6, 5)
    x = (torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) < 0.5).double()
    logits = nade.conditionals(x, W, c, V, b)
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(1)
    torch.testing.assert_close(nade.log_prob(x, W, c, V, b), expected)
    far = nade.log_prob(x, W * 100, c, V * 100, b)  # logits of hundreds: still finite
    assert bool(torch.isfinite(far).all())


@pytest.mark.parametrize("activation", nade.ACTIVATIONS)
def test_gradcheck(activation):
    W, c, V, b = (t.requires_grad_() for t in _params(5, 4))
    x = (torch.rand(3, 5, generator=torch.Generator().manual_seed(4)) < 0.5).double()
    order = _orderings("per_sample", 3, 5)
    torch.autograd.gradcheck(lambda *p: nade.log_prob(x, *p, order, activation), (W, c, V, b))
    torch.autograd.gradcheck(lambda *p: nade.conditionals(x, *p, order, activation), (W, c, V, b))


@pytest.mark.parametrize("activation", nade.ACTIVATIONS)
def test_probabilities_sum_to_one_and_samples_follow_them(activation):
    dims, n = 8, 40000
    W, c, V, b = _params(dims, 6, seed=5)
    order = _orderings("shared", 1, dims)
    every_x = torch.tensor(list(itertools.product([0.0, 1.0], repeat=dims)), dtype=torch.float64)
    p = nade.log_prob(every_x, W, c, V, b, order, activation).exp()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))

    uniforms = torch.rand(n, dims, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    samples = nade.sample(W, c, V, b, uniforms, order, activation)
    codes = (samples * 2 ** torch.arange(dims - 1, -1, -1, dtype=torch.float64)).sum(1).long()
    frequencies = torch.bincount(codes, minlength=2**dims).double() / n
    # every configuration's frequency within 5 binomial standard deviations of its probability
    sigma = (p * (1 - p) / n).sqrt()
    assert bool(((frequencies - p).abs() <= 5 * sigma + 1e-4).all())
    # and per-dimension marginals
    marginals = (every_x * p[:, None]).sum(0)
    torch.testing.assert_close(samples.mean(0), marginals, atol=0.01, rtol=0)


def test_conditional_completion_keeps_the_observed_prefix():
    dims = 6
    W, c, V, b = _params(dims, 5, seed=7)
    order = _orderings("per_sample", 4, dims)
    observed = (torch.rand(4, dims, generator=torch.Generator().manual_seed(8)) < 0.5).double()
    uniforms = torch.rand(4, dims, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = nade.sample(W, c, V, b, uniforms, order, observed=observed, num_observed=3)
    rows = torch.arange(4)[:, None]
    assert torch.equal(x[rows, order[:, :3]], observed[rows, order[:, :3]])
    # the rest follows the conditionals given the prefix: the same draw with the prefix sampled
    # from those values reproduces it
    again = nade.sample(W, c, V, b, torch.where(observed > 0, 0.0, 1.0 - 1e-12).where(
        torch.zeros_like(observed, dtype=torch.bool).scatter(1, order[:, :3], True), uniforms), order)
    assert torch.equal(again, x)


@pytest.mark.parametrize("random_degrees", [False, True])
@pytest.mark.parametrize("ordering", [None, [3, 0, 4, 1, 2]])
def test_made_masks_make_the_network_autoregressive(ordering, random_degrees):
    dims, hidden = 5, [16, 16]
    generator = torch.Generator().manual_seed(10) if random_degrees else None
    degrees = nade.made_degrees(dims, hidden, ordering, generator)
    masks = nade.made_masks(degrees)
    g = torch.Generator().manual_seed(11)
    sizes = [dims] + hidden + [dims]
    weights = [torch.randn(o, i, generator=g, dtype=torch.float64) for i, o in zip(sizes[:-1], sizes[1:])]

    def network(x):
        for w, m in zip(weights[:-1], masks[:-1]):
            x = torch.relu(nade.masked_linear(x, w, m))
        return nade.masked_linear(x, weights[-1], masks[-1])

    x = torch.randn(dims, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(network, x)  # (outputs, inputs)
    position = degrees[0] - 1  # each dimension's place in the ordering
    allowed = position[:, None] > position[None, :]  # output d may depend on the inputs visited before d
    assert bool((jacobian[~allowed] == 0).all())
    assert bool((jacobian[allowed] != 0).any())
