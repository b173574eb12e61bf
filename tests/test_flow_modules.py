"""genfast.nn's flow layers: inverses, log-determinants against autograd Jacobians, ActNorm's
data-dependent initialisation, and fused layers against reference layers."""

import copy

import pytest
import torch
from torch import nn

from genfast.nn import ActNorm, AffineCoupling, InvertibleConv1x1, set_impl
from conftest import fused_impls, skip_unless_runs

IMPLS = [*fused_impls(), "reference"]


def _conv(in_channels, out_channels):
    net = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    nn.init.normal_(net.weight, std=0.3)  # far enough from identity for the checks to mean something
    return net


def _mlp(in_features, out_features):
    return nn.Sequential(nn.Linear(in_features, 8), nn.Tanh(), nn.Linear(8, out_features))


def _checkerboard(c, h, w):
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((i + j) % 2 == 0).expand(c, h, w).clone()


def _initialised_actnorm(order):
    layer = ActNorm(3, order=order)
    layer(torch.randn(16, 3, 4, 4) * torch.tensor([0.5, 2.0, 3.0]).view(3, 1, 1) + 1.0)
    return layer


def _trained_invconv(channels, seed):
    """A rotation has log|det| = 0: move the parameters as training would."""
    layer = InvertibleConv1x1(channels, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.log_diag.add_(0.3 * torch.randn(channels))
        layer.lower.add_(0.2 * torch.randn(channels, channels).tril(-1))
        layer.upper.add_(0.2 * torch.randn(channels, channels).triu(1))
    return layer


# name: (layer factory, sample shape)
CASES = {
    "coupling_masked_checkerboard_tanh": (
        lambda: AffineCoupling(_checkerboard(2, 4, 4), _conv(2, 4), layout="masked", scale_fn="tanh"), (2, 4, 4)),
    "coupling_masked_2d_exp": (
        lambda: AffineCoupling(torch.tensor([True, False]), _mlp(2, 4), layout="masked", scale_fn="exp"), (2,)),
    "coupling_split_channels_glow": (
        lambda: AffineCoupling(torch.tensor([False, False, True, True]), _conv(2, 4), layout="split",
                               scale_fn="sigmoid", eps=0.0, order="glow"), (4, 3, 3)),
    "coupling_split_interleaved_softplus": (
        lambda: AffineCoupling(torch.tensor([True, False, True, False, True]), _mlp(2, 6), layout="split",
                               scale_fn="softplus"), (5,)),
    "coupling_split_checkerboard_atan": (
        lambda: AffineCoupling(_checkerboard(1, 4, 4), nn.Sequential(nn.Linear(8, 16)), layout="split",
                               scale_fn="atan"), (1, 4, 4)),
    "coupling_split_channels_soft_bound": (
        lambda: AffineCoupling(torch.tensor([True, False, False]), _conv(2, 2), layout="split",
                               scale_fn="soft_bound", order="glow"), (3, 2, 3)),
    "actnorm_affine": (lambda: _initialised_actnorm("affine"), (3, 4, 4)),
    "actnorm_glow": (lambda: _initialised_actnorm("glow"), (3, 4, 4)),
    "invconv_4d": (lambda: _trained_invconv(4, 1), (4, 3, 2)),
    "invconv_2d": (lambda: _trained_invconv(3, 2), (3,)),
}


def _make(name, impl="reference"):
    torch.manual_seed(0)
    factory, shape = CASES[name]
    layer = set_impl(factory(), impl)
    return layer, torch.randn(4, *shape)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_inverse_round_trips(impl, name):
    skip_unless_runs(impl, "cpu")
    layer, x = _make(name, impl)
    y, logdet = layer(x)
    x_back, logdet_inverse = layer.inverse(y)
    assert logdet.shape == (4,) and logdet.dtype == torch.float32
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet_inverse, -logdet, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(y, x)


def _jacobian_logdet(f, x):
    jac = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0))[0].squeeze(0), x)
    return torch.linalg.slogdet(jac.reshape(x.numel(), x.numel()).double())[1].float()


# genfast.flows takes float32/float16/bfloat16 only (impl="reference" too), so the Jacobian is a
# float32 one, its determinant taken in float64.
@pytest.mark.parametrize("name", CASES)
def test_logdet_is_the_log_abs_det_of_the_jacobian(name):
    layer, x = _make(name)
    layer.eval()
    for f in (layer, layer.inverse):
        _, logdet = f(x)
        expected = torch.stack([_jacobian_logdet(f, sample) for sample in x])
        torch.testing.assert_close(logdet, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("order", ["affine", "glow"])
def test_actnorm_initialises_from_the_first_training_batch(order):
    layer = ActNorm(3, order=order)
    scale, mean = torch.tensor([0.1, 1.0, 7.0]).view(3, 1, 1), torch.tensor([-4.0, 0.0, 2.0]).view(3, 1, 1)
    x = torch.randn(64, 3, 5, 5) * scale + mean
    y, _ = layer(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(3), rtol=0, atol=1e-4)
    state = copy.deepcopy(layer.state_dict())
    layer(x * 2)  # later batches train the parameters, they do not set them
    assert torch.equal(layer.log_scale, state["log_scale"]) and torch.equal(layer.bias, state["bias"])
    restored = ActNorm(3, order=order)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(x)[0], y)


def test_invertible_conv_starts_as_a_rotation():
    layer = InvertibleConv1x1(5, generator=torch.Generator().manual_seed(3))
    weight, logabsdet = layer.weight()
    torch.testing.assert_close(weight @ weight.T, torch.eye(5), rtol=0, atol=1e-5)
    assert abs(logabsdet.item()) < 1e-5 and layer.perm.dtype == torch.int64


def test_actnorm_in_eval_mode_does_not_initialise():
    layer = ActNorm(2).eval()
    x = torch.randn(8, 2, 3, 3) + 5
    torch.testing.assert_close(layer(x)[0], x)


def test_coupling_passes_its_index_buffer_and_a_view_of_the_identity_channels(monkeypatch):
    seen = {}

    class Conditioner(nn.Module):
        def forward(self, h):
            seen["storage"] = h.untyped_storage().data_ptr()
            return torch.zeros(h.shape[0], 4, *h.shape[2:])

    calls = []
    import genfast.nn.coupling as coupling

    real = coupling.flows.affine_coupling
    monkeypatch.setattr(coupling.flows, "affine_coupling", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    layer = AffineCoupling(torch.tensor([False, False, True, True]), Conditioner(), layout="split", impl="reference")
    x = torch.randn(3, 4, 2, 2)
    layer(x)
    layer.inverse(x)
    assert seen["storage"] == x.untyped_storage().data_ptr()
    assert calls[0] is calls[1] is layer.index and layer.index.dtype == torch.int32
    assert "index" not in layer.state_dict()


def test_coupling_rejects_bad_options():
    with pytest.raises(ValueError, match="layout"):
        AffineCoupling(torch.tensor([True, False]), _mlp(2, 4), layout="interleaved")
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling(torch.tensor([True, True]), _mlp(2, 4))
    with pytest.raises(ValueError, match="clamp"):
        AffineCoupling(torch.tensor([True, False]), _mlp(2, 4), scale_fn="tanh", clamp=0.0)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_fused_layer_matches_reference_layer(impl, name, direction):
    skip_unless_runs(impl, "cpu")
    fused, x = _make(name, impl)
    ref = set_impl(copy.deepcopy(fused), "reference")
    grad_y, grad_logdet = torch.randn_like(x), torch.randn(x.shape[0])
    results = []
    for layer in (fused, ref):
        xi = x.clone().requires_grad_()
        y, logdet = getattr(layer, direction)(xi)
        ((y * grad_y).sum() + (logdet * grad_logdet).sum()).backward()
        results.append([y, logdet, xi.grad] + [p.grad for p in layer.parameters()])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
