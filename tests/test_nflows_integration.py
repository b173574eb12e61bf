"""genfast.integrations.nflows.AffineCouplingTransform against nflows' own: same outputs,
log-determinants and gradients, in 2-D and 4-D, inside nflows' composites and flows."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import fused_impls, skip_unless_runs

IMPLS = [*fused_impls(), "reference"]


@pytest.fixture
def nflows():
    return pytest.importorskip("nflows")


def _pair(case, impl, unconditional=False, seed=0):
    """(nflows' transform, genfast's) with the same state, and an input (and context) for them."""
    import nflows.transforms as transforms
    from nflows.nn.nets import ConvResidualNet, ResidualNet
    from nflows.utils.torchutils import create_alternating_binary_mask

    from genfast.integrations.nflows import AffineCouplingTransform

    torch.manual_seed(seed)
    if case == "2d":
        mask, shape, context = create_alternating_binary_mask(5, even=True), (5,), torch.randn(6, 3)
        net = lambda i, o: ResidualNet(i, o, hidden_features=16, context_features=3, num_blocks=1)  # noqa: E731
    else:
        mask, shape, context = torch.tensor([0, 1, 1, 0]), (4, 3, 5), None
        net = lambda i, o: ConvResidualNet(i, o, hidden_channels=8, num_blocks=1)  # noqa: E731
    uncond = (lambda features: transforms.ActNorm(features)) if unconditional else None
    theirs = transforms.AffineCouplingTransform(mask, net, unconditional_transform=uncond)
    with torch.no_grad():
        for p in theirs.parameters():  # nflows' nets start near the identity; move away from it
            p.add_(0.2 * torch.randn_like(p))
    if unconditional:
        theirs.unconditional_transform.initialized.fill_(True)
    ours = AffineCouplingTransform(mask, net, unconditional_transform=uncond, impl=impl)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours, 2 * torch.randn(6, *shape), context


CASES = [("2d", False), ("4d", False), ("2d", True), ("4d", True)]
IDS = ["2d", "4d", "2d_unconditional", "4d_unconditional"]


@pytest.mark.parametrize("case,unconditional", CASES, ids=IDS)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_nflows_outputs_logabsdet_and_gradients(nflows, impl, direction, case, unconditional):
    skip_unless_runs(impl, "cpu")
    theirs, ours, x, context = _pair(case, impl, unconditional)
    grad_out, grad_logabsdet = torch.randn_like(x), torch.randn(x.shape[0])
    results = []
    for transform in (theirs, ours):
        xi = x.clone().requires_grad_()
        y, logabsdet = getattr(transform, direction)(xi, context=context)
        ((y * grad_out).sum() + (logabsdet * grad_logabsdet).sum()).backward()
        results.append([y, logabsdet, xi.grad] + [p.grad for p in transform.parameters()])
    assert results[1][1].shape == (x.shape[0],)
    assert not torch.allclose(results[0][0], x)
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_caches_one_index_per_device_and_shape(nflows, impl):
    skip_unless_runs(impl, "cpu")
    _, ours, x, _ = _pair("4d", impl)
    ours(x)
    ours.inverse(x)
    ours(torch.randn(2, 4, 2, 2))
    assert len(ours._indices) == 2
    index = ours._indices[(x.device, (4, 3, 5))]
    assert index.dtype == torch.int32 and index.tolist()[:16] == [-1] * 15 + [0]


def test_rejects_what_nflows_rejects(nflows):
    _, ours, x, context = _pair("2d", "reference")
    with pytest.raises(ValueError, match="2D or a 4D"):
        ours(x[:, :, None], context)
    with pytest.raises(ValueError, match="features = 5"):
        ours(x[:, :4], context)


def _composite(transform_cls, impl=None):
    import nflows.transforms as transforms
    from nflows.nn.nets import ResidualNet
    from nflows.utils.torchutils import create_alternating_binary_mask

    def net(i, o):
        return ResidualNet(i, o, hidden_features=16, num_blocks=1)

    layers = []
    for k in range(3):
        kwargs = {} if impl is None else {"impl": impl}
        layers += [transform_cls(create_alternating_binary_mask(4, even=k % 2 == 0), net, **kwargs),
                   transforms.ReversePermutation(4)]
    return transforms.CompositeTransform(layers)


def _standard_normal_log_prob(z):
    return -0.5 * (z**2 + torch.log(torch.tensor(2 * torch.pi))).sum(1)


@pytest.mark.parametrize("impl", IMPLS)
def test_works_inside_an_nflows_composite_transform(nflows, impl):
    skip_unless_runs(impl, "cpu")
    from nflows.transforms import AffineCouplingTransform as Theirs

    from genfast.integrations.nflows import AffineCouplingTransform as Ours

    torch.manual_seed(0)
    theirs = _composite(Theirs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = _composite(Ours, impl)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(32, 4)
    (z_theirs, ld_theirs), (z_ours, ld_ours) = theirs(x), ours(x)
    torch.testing.assert_close(z_ours, z_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_standard_normal_log_prob(z_ours) + ld_ours,
                               _standard_normal_log_prob(z_theirs) + ld_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.inverse(z_ours)[0], x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_works_inside_an_nflows_flow(nflows, impl):
    skip_unless_runs(impl, "cpu")
    # nflows 0.14's flows and distributions import matplotlib (nflows.nn.nde.made)
    base = pytest.importorskip("nflows.flows.base")
    from nflows.distributions.normal import StandardNormal
    from nflows.transforms import AffineCouplingTransform as Theirs

    from genfast.integrations.nflows import AffineCouplingTransform as Ours

    torch.manual_seed(0)
    theirs = base.Flow(_composite(Theirs), StandardNormal([4]))
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = base.Flow(_composite(Ours, impl), StandardNormal([4]))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(32, 4)
    torch.testing.assert_close(ours.log_prob(x), theirs.log_prob(x), rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    samples_theirs = theirs.sample(16)
    torch.manual_seed(1)
    torch.testing.assert_close(ours.sample(16), samples_theirs, rtol=1e-5, atol=1e-5)


def test_says_how_to_install_nflows_when_it_is_missing(monkeypatch):
    for name in [m for m in sys.modules if m == "nflows" or m.startswith("nflows.")] + ["nflows"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "genfast.integrations.nflows", raising=False)
    with pytest.raises(ImportError, match="pip install nflows"):
        importlib.import_module("genfast.integrations.nflows")


def test_importing_genfast_does_not_import_nflows():
    code = ("import sys, genfast, genfast.flows, genfast.nn, genfast.models, genfast.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'nflows'))")
    env = dict(os.environ, GENFAST_QUIET="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"
