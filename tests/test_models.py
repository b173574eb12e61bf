"""The small DDPM trained on scikit-learn's digits: fused and reference samplers agree, and sampling works."""

import pytest
import torch

from genfast.models import DDPM
from genfast.models.data import digits
from conftest import fused_impls, skip_unless_runs

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = digits()
    model = DDPM(data.shape[1:], timesteps=100)
    losses = model.fit(data, steps=300)
    return model, data, losses


@pytest.mark.slow
def test_training_reduces_the_loss(trained):
    _, _, losses = trained
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


def _energy_distance(a, b):
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


@pytest.mark.slow
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_schedule", "tensor_schedule"])
def test_fused_sampler_matches_reference_sampler(trained, impl, per_sample):
    skip_unless_runs(impl, "cpu")
    model, data, _ = trained
    generator = torch.Generator().manual_seed(1)
    x_T, noises = model.noise_for_sampling(64, generator)
    fused = model.sample(64, impl=impl, x_T=x_T, noises=noises, per_sample_timesteps=per_sample)
    ref = model.sample(64, impl="reference", x_T=x_T, noises=noises, per_sample_timesteps=per_sample)
    # 100 steps through a network: float32 rounding against the float64 reference compounds a little
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    held_out = data[-256:]
    assert _energy_distance(fused, held_out) < 0.5 * _energy_distance(x_T, held_out)


@pytest.mark.slow
def test_in_kernel_noise_sampler_reaches_the_data(trained):
    model, data, _ = trained
    samples = model.sample(128, generator=torch.Generator().manual_seed(2))
    start = torch.randn_like(samples)
    held_out = data[-256:]
    assert torch.isfinite(samples).all()
    assert _energy_distance(samples, held_out) < 0.5 * _energy_distance(start, held_out)
