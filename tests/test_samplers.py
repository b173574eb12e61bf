"""Samplers and reference models of the energy- and score-based families: fused and reference
chains agree from the same noise, and trained samplers move toward the data."""

import pytest
import torch

import genfast
from genfast import samplers
from genfast.models import EBM, NoiseConditionalScore
from genfast.models.data import digits
from genfast.models.score import default_sigmas, energy_distance, two_moons
from conftest import fused_impls, skip_unless_runs

pytest.importorskip("sklearn")


def standard_normal_score(x, sigma):
    """The score of N(0, I) data perturbed by noise of level sigma: N(0, (1 + sigma^2) I)."""
    return -x / (1 + sigma**2)


def test_replay_buffer_reinitializes_at_its_rate():
    g = torch.Generator().manual_seed(0)
    buffer = samplers.ReplayBuffer(1000, lambda n: torch.full((n, 2), 7.0), reinit_prob=0.25, generator=g)
    buffer.samples.zero_()
    x, index = buffer.sample(4000)
    fresh = (x[:, 0] == 7.0).float().mean().item()
    assert abs(fresh - 0.25) < 0.03
    buffer.push(x[:1] + 1, index[:1])
    assert torch.equal(buffer.samples[index[0]], x[0] + 1)
    with pytest.raises(ValueError, match="reinit_prob must be in"):
        samplers.ReplayBuffer(4, lambda n: torch.zeros(n, 2), reinit_prob=2.0)


@pytest.mark.parametrize("impl", fused_impls())
def test_chains_on_a_gaussian_agree_with_reference_and_reach_it(impl):
    skip_unless_runs(impl, "cpu")
    x0 = torch.randn(64, 2) * 3 + 5
    for sampler in (
        lambda x, i, g: samplers.annealed_langevin(standard_normal_score, x, [1.0, 0.5], steps_per_level=60,
                                                   step_lr=0.05, generator=g, impl=i),
        lambda x, i, g: samplers.pc_sampler_ve(standard_normal_score, x, [2.0, 1.0, 0.5, 0.1], snr=0.2,
                                               corrector_steps=3, generator=g, impl=i),
        lambda x, i, g: samplers.sgld(lambda y: 0.5 * (y**2).sum(1), x, 80, 0.05, noise_std=0.316, generator=g,
                                      impl=i),
    ):
        fused = sampler(x0, impl, genfast.PhiloxGenerator(3))
        ref = sampler(x0, "reference", genfast.PhiloxGenerator(3))
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
        assert fused.mean().abs() < 1.0 and torch.isfinite(fused).all()


def test_pc_sampler_vp_runs_and_matches_reference():
    x0 = torch.randn(64, 2)
    score = lambda x, t: -x  # noqa: E731  (a standard normal is stationary for the VP SDE)
    fused = samplers.pc_sampler_vp(score, x0, num_steps=20, generator=genfast.PhiloxGenerator(1))
    ref = samplers.pc_sampler_vp(score, x0, num_steps=20, generator=genfast.PhiloxGenerator(1), impl="reference")
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    assert abs(fused.std().item() - 1.0) < 0.3


@pytest.fixture(scope="module")
def moons_score_model():
    torch.manual_seed(0)
    data = two_moons(2048)
    model = NoiseConditionalScore(2, default_sigmas(data, num_levels=8, sigma_min=0.05))
    model.fit(data, steps=600)
    return model, data


@pytest.mark.slow
def test_score_model_samples_with_fused_steps_like_reference(moons_score_model):
    impl = "native"  # the Triton kernels are compared with the reference in test_langevin.py
    skip_unless_runs(impl, "cpu")
    model, data = moons_score_model
    start = torch.randn(512, 2, generator=torch.Generator().manual_seed(4)) * model.sigmas[0]
    fused = model.sample(start, generator=genfast.PhiloxGenerator(6), impl=impl)
    ref = model.sample(start, generator=genfast.PhiloxGenerator(6), impl="reference")
    torch.testing.assert_close(fused, ref, rtol=2e-3, atol=2e-3)
    held_out = two_moons(512, seed=1)
    assert energy_distance(fused, held_out) < 0.2 * energy_distance(start, held_out)


@pytest.mark.slow
def test_score_model_on_digits_moves_toward_the_data():
    torch.manual_seed(0)
    data = digits().flatten(1)
    model = NoiseConditionalScore(64, default_sigmas(data, num_levels=8, sigma_min=0.1), hidden=256)
    model.fit(data[:-256], steps=600, batch_size=128)
    start = torch.randn(128, 64, generator=torch.Generator().manual_seed(2)) * model.sigmas[0]
    samples = model.sample(start, steps_per_level=20, step_lr=5e-3, generator=genfast.PhiloxGenerator(2))
    held_out = data[-256:]
    assert torch.isfinite(samples).all()
    assert energy_distance(samples, held_out) < 0.1 * energy_distance(start, held_out)


@pytest.mark.cuda
def test_replay_buffer_and_ebm_on_a_gpu_take_the_cpu_generator():
    """A buffer on a GPU drawn from a CPU generator (the EBM's), and an EBM moved to a GPU: its chains
    follow it, its negatives and samples are on the GPU."""
    skip_unless_runs("native", "cuda")
    g = torch.Generator().manual_seed(0)
    buffer = samplers.ReplayBuffer(8, lambda n: torch.zeros(n, 2, device="cuda"), generator=g)
    x, index = buffer.sample(5)
    assert x.device.type == index.device.type == "cuda"
    model = EBM(2, buffer_size=64, sgld_steps=2).cuda()
    losses = model.fit(two_moons(64).cuda(), steps=2, batch_size=16)
    assert len(losses) == 2 and model.buffer.samples.device.type == "cuda"
    assert model.sample(4, num_steps=2).device.type == "cuda"


@pytest.mark.slow
def test_ebm_trained_with_fused_sgld_moves_toward_the_data():
    torch.manual_seed(0)
    data = two_moons(2048)
    model = EBM(2, sgld_steps=20, step_size=0.05, noise_std=0.05)
    model.fit(data, steps=250)
    samples = model.sample(512, num_steps=100, generator=genfast.PhiloxGenerator(9))
    start = (torch.rand(512, 2, generator=torch.Generator().manual_seed(9)) * 2 - 1) * model.box
    held_out = two_moons(512, seed=1)
    assert energy_distance(samples, held_out) < 0.5 * energy_distance(start, held_out)
    # the same chains on the reference ops
    fused = model.sample(64, num_steps=30, generator=genfast.PhiloxGenerator(1))
    model.generator.manual_seed(0)
    ref = model.sample(64, num_steps=30, generator=genfast.PhiloxGenerator(1), impl="reference")
    model.generator.manual_seed(0)
    fused = model.sample(64, num_steps=30, generator=genfast.PhiloxGenerator(1))
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_ebm_on_digits_moves_toward_the_data():
    torch.manual_seed(0)
    data = digits().flatten(1)
    model = EBM(64, box=1.0, hidden=256, sgld_steps=20, step_size=0.5, noise_std=0.01)
    model.fit(data[:-256], steps=150, batch_size=128)
    samples = model.sample(256, num_steps=100, generator=genfast.PhiloxGenerator(3))
    start = (torch.rand(256, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1) * model.box
    held_out = data[-256:]
    assert torch.isfinite(samples).all() and samples.abs().max() <= model.box
    assert energy_distance(samples, held_out) < 0.5 * energy_distance(start, held_out)
