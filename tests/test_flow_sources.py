"""Each scale parameterization of the coupling op against the library it comes from: nflows
(sigmoid(u + 2) + 1e-3), zuko (the soft bound) and FrEIA (the atan and tanh soft clamps)."""

import pytest
import torch

from genfast import flows
from genfast.reference import flows as reference

U = torch.linspace(-1e3, 1e3, 2001, dtype=torch.float64).tolist() + [-1e30, -50.0, -1e-3, 0.0, 1e-3, 50.0, 1e30]


def _log_scale(u, scale_fn, **options):
    return reference.scale_and_log_scale(u, scale_fn, flows.scale_param(scale_fn, **options))[1]


def test_sigmoid_is_nflows_affine_coupling_scale():
    coupling = pytest.importorskip("nflows.transforms.coupling")
    transform = coupling.AffineCouplingTransform(torch.tensor([0, 1]), lambda i, o: torch.nn.Identity())
    u = torch.tensor(U, dtype=torch.float32)[:, None]
    params = torch.cat([torch.zeros_like(u), u], dim=1)
    scale, _ = transform._scale_and_shift(params)
    torch.testing.assert_close(_log_scale(u, "sigmoid"), torch.log(scale), rtol=0, atol=0)


@pytest.mark.parametrize("slope", [1e-3, 0.1])
def test_soft_bound_is_zukos_monotonic_affine(slope):
    zuko = pytest.importorskip("zuko")
    u = torch.tensor(U, dtype=torch.float64)
    transform = zuko.transforms.MonotonicAffineTransform(torch.zeros_like(u), u, slope=slope)
    torch.testing.assert_close(_log_scale(u, "soft_bound", slope=slope), transform.log_scale, rtol=1e-15, atol=0)


@pytest.mark.parametrize("activation,scale_fn", [("ATAN", "atan"), ("TANH", "tanh")])
def test_soft_clamps_are_freias(activation, scale_fn):
    """FrEIA 0.2's blocks compute clamp * f(u); the RealNVP form genfast takes is clamp * f(u / clamp),
    so FrEIA's log-scale of u is genfast's of clamp * u."""
    coupling_layers = pytest.importorskip("FrEIA.modules.coupling_layers")
    clamp = 1.7
    block = coupling_layers.GLOWCouplingBlock([(4,)], subnet_constructor=lambda i, o: torch.nn.Linear(i, o),
                                              clamp=clamp, clamp_activation=activation)
    u = torch.tensor(U, dtype=torch.float64)
    freia = block.clamp * block.f_clamp(u)
    torch.testing.assert_close(_log_scale(u * clamp, scale_fn, clamp=clamp), freia, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale_fn", reference.SCALE_FNS)
def test_log_scale_is_log_of_scale(scale_fn):
    u = torch.tensor(U, dtype=torch.float64).clamp(-80, 80)
    s, log_s = reference.scale_and_log_scale(u, scale_fn, flows.scale_param(scale_fn))
    torch.testing.assert_close(torch.log(s), log_s)
