"""MALA's fused accept/reject against the reference, and as an exact sampler."""

import pytest
import torch

import genfast
from genfast import samplers
from conftest import devices, fused_impls, skip_unless_runs, skip_unless_supported


def _inputs(shape, device, dtype=torch.float32, per_sample_step=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = shape[0]
    x, grad_x, z, grad_y = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    step = torch.linspace(0.05, 0.2, rows, device=device) if per_sample_step else 0.1
    eps = step.reshape((-1,) + (1,) * (len(shape) - 1)) if per_sample_step else step
    y = (x + eps * grad_x + (2 * eps) ** 0.5 * z).to(dtype)
    # energies that put log(acceptance ratio) near 0, so that decisions go both ways
    e = eps if not per_sample_step else eps.double()
    forward = ((y.double() - x.double() - e * grad_x.double()) ** 2).reshape(rows, -1).sum(1)
    backward = ((x.double() - y.double() - e * grad_y.double()) ** 2).reshape(rows, -1).sum(1)
    energy_x = torch.randn(rows, generator=g).to(device) * 3
    log_q_ratio = (forward - backward) / (4 * (step if not per_sample_step else step.double()))
    energy_y = (energy_x.double() + log_q_ratio + torch.randn(rows, generator=g).double().to(device)).float()
    uniform = torch.rand(rows, generator=g, dtype=torch.float64).to(device)
    return x, y, grad_x, grad_y, energy_x, energy_y, step, uniform


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(64, 3, 5, 5), (33, 40000), (1, 1)], ids=str)
@pytest.mark.parametrize("per_sample_step", [False, True])
def test_matches_reference(per_sample_step, shape, dtype, impl, device):
    skip_unless_supported(impl, device, dtype)
    x, y, gx, gy, ex, ey, step, u = _inputs(shape, device, dtype, per_sample_step)
    got = genfast.mala_accept(x, y, gx, gy, ex, ey, step, uniform=u, impl=impl)
    ref = genfast.mala_accept(x, y, gx, gy, ex, ey, step, uniform=u, impl="reference")
    assert torch.equal(got.accepted, ref.accepted)
    assert 0 < got.accepted.sum() < shape[0] or shape[0] == 1
    assert torch.equal(got.x, ref.x) and torch.equal(got.grad, ref.grad) and torch.equal(got.energy, ref.energy)
    torch.testing.assert_close(got.acceptance_rate, ref.acceptance_rate)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_in_place_and_non_contiguous(impl, device):
    skip_unless_supported(impl, device)
    x, y, gx, gy, ex, ey, step, u = _inputs((16, 6, 10), device)
    ref = genfast.mala_accept(x, y, gx, gy, ex, ey, step, uniform=u, impl="reference")
    xi, gi, ei = x.clone(), gx.clone(), ex.clone()
    result = genfast.mala_accept(xi, y, gi, gy, ei, ey, step, uniform=u, in_place=True, impl=impl)
    assert result.x is xi and torch.equal(xi, ref.x) and torch.equal(gi, ref.grad) and torch.equal(ei, ref.energy)
    t = [a.transpose(1, 2).contiguous().transpose(1, 2) for a in (x, y, gx, gy)]
    got = genfast.mala_accept(*t, ex, ey, step, uniform=u, impl=impl)
    assert torch.equal(got.x, ref.x) and torch.equal(got.grad, ref.grad)


def test_nan_proposals_are_rejected():
    x, y, gx, gy, ex, ey, step, u = _inputs((8, 4), "cpu")
    ey[2] = float("nan")
    y[5, 1] = float("nan")
    for impl in ["native", "reference"]:
        result = genfast.mala_accept(x, y, gx, gy, ex, ey, step, uniform=u, impl=impl)
        assert not result.accepted[2] and not result.accepted[5]
        assert torch.isfinite(result.x).all()


@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_mala_keeps_a_gaussian_invariant(impl):
    """Detailed balance: started from the target N(0, 1), the chains stay there."""
    skip_unless_runs(impl, "cpu") if impl != "reference" else None
    n = 4096 if impl != "triton" else 512
    x0 = torch.randn(n, 1, generator=torch.Generator().manual_seed(1))
    samples, rates = samplers.mala(lambda x: 0.5 * (x**2).sum(1), x0, 30, 0.8,
                                   generator=genfast.PhiloxGenerator(4), impl=impl)
    tolerance = 5 / n**0.5
    assert abs(samples.mean().item()) < tolerance
    assert abs(samples.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert 0.6 < rates.mean().item() < 1.0  # eps = 0.8 on N(0, 1): most, not all, proposals pass


@pytest.mark.parametrize("impl", fused_impls())
def test_mala_chain_matches_reference_chain(impl):
    skip_unless_runs(impl, "cpu")
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(2)) * 2
    energy = lambda x: 0.5 * (x**2).sum(1) + 0.3 * torch.sin(3 * x).sum(1)  # noqa: E731
    fused, fused_rates = samplers.mala(energy, x0, 20, 0.3, generator=genfast.PhiloxGenerator(5), impl=impl)
    ref, ref_rates = samplers.mala(energy, x0, 20, 0.3, generator=genfast.PhiloxGenerator(5), impl="reference")
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_rates, ref_rates)


def test_bad_input():
    x, y, gx, gy, ex, ey, step, u = _inputs((4, 3), "cpu")
    with pytest.raises(ValueError, match="energy_y must be a tensor with one energy per sample"):
        genfast.mala_accept(x, y, gx, gy, ex, ey[:2], step)
    with pytest.raises(ValueError, match="step_size must be in"):
        genfast.mala_accept(x, y, gx, gy, ex, ey, 0.0)
    with pytest.raises(ValueError, match="grad_y must have the shape"):
        genfast.mala_accept(x, y, gx, gy[:2], ex, ey, step)
    with pytest.raises(ValueError, match="uniform must hold one value per sample"):
        genfast.mala_accept(x, y, gx, gy, ex, ey, step, uniform=torch.rand(3, dtype=torch.float64))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck(impl, device):
    skip_unless_supported(impl, device)
    x, y, gx, gy, ex, ey, _, u = _inputs((5, 7), device)
    op = torch.ops.genfast.mala_accept if impl == "native" else torch.ops.genfast.mala_accept_triton
    for step in (torch.full((1,), 0.1, device=device), torch.linspace(0.1, 0.2, 5, device=device)):
        torch.library.opcheck(op, (x, y, gx, gy, ex, ey, step, u, torch.empty_like(x), torch.empty_like(x),
                                   torch.empty_like(ex), torch.empty(5, dtype=torch.bool, device=device)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_torch_compile_fullgraph(impl, device):
    skip_unless_supported(impl, device)
    torch._dynamo.reset()
    x, y, gx, gy, ex, ey, step, u = _inputs((6, 3, 4), device, per_sample_step=True)

    def accept(*tensors):
        return genfast.mala_accept(*tensors, step, uniform=u, impl=impl)

    compiled = torch.compile(accept, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    got, expected = compiled(x, y, gx, gy, ex, ey), accept(x, y, gx, gy, ex, ey)
    assert torch.equal(got.accepted, expected.accepted) and torch.equal(got.x, expected.x)
