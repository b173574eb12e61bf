"""genfast's Philox stream: known-answer vectors, the same stream on every backend, its statistics."""

import pytest
import torch

import genfast
from genfast.random import PhiloxGenerator, kernel_noise_key, next_philox_key, takes_cuda_generator
from genfast.reference.random import philox4x32_10, philox_normal
from conftest import devices, fused_impls, skip_unless_runs
from genfast.testing.tolerances import assert_same_normals

# Random123's known-answer vectors for Philox-4x32-10: (counter, key, output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_reference_philox_known_answers(counter, key, expected):
    words = philox4x32_10([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


def in_kernel_normals(shape, seed, offset, impl, device="cpu"):
    """The normals a fused op draws for (seed, offset): a stochastic flow-matching step with
    sigma_next = 1 returns exactly its noise."""
    zeros = torch.zeros(shape, device=device)
    return genfast.flow_match_euler_step(zeros, zeros, 0.5, 1.0, stochastic_sampling=True,
                                         generator=PhiloxGenerator(seed, offset), impl=impl)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("numel", [1, 3, 4, 5, 63, 64, 65, 4099])
def test_stream_matches_reference(numel, impl, device):
    skip_unless_runs(impl, device)
    for seed, offset in [(0, 0), (123456789, 8), ((1 << 64) - 1, (1 << 40) + 4)]:
        got = in_kernel_normals((numel,), seed, offset, impl, device)
        assert_same_normals(got, philox_normal((numel,), seed, offset, device=device))


@pytest.mark.parametrize("impl", fused_impls())
def test_element_stream_is_independent_of_shape_and_blocking(impl):
    skip_unless_runs(impl, "cpu")
    flat = in_kernel_normals((6 * 1031,), 9, 4, impl)
    shaped = in_kernel_normals((6, 1031), 9, 4, impl)
    torch.testing.assert_close(shaped.reshape(-1), flat, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_normal_statistics(impl, device):
    skip_unless_runs(impl, device) if impl != "reference" else None
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 1 << 18 if impl == "triton" and device == "cpu" else 1 << 20
    z = in_kernel_normals((n,), 31337, 0, impl, device).double().cpu()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert scipy_stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    # pairs from one Philox call must be uncorrelated too
    pairs = z[: n - n % 4].reshape(-1, 4)
    corr = torch.corrcoef(pairs.T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 5 / (n / 4) ** 0.5


def test_generators_advance_like_torch_cuda():
    g = PhiloxGenerator(42)
    assert next_philox_key(g, torch.device("cpu")) == (42, 0)
    assert next_philox_key(g, torch.device("cpu")) == (42, 4)
    g.manual_seed(42)
    assert g.get_offset() == 0


@pytest.mark.cuda
def test_cuda_generator_offset_advances():
    g = torch.Generator("cuda").manual_seed(3)
    assert next_philox_key(g, torch.device("cuda")) == (3, 0)
    assert g.get_offset() == 4


def test_only_cuda_generators_go_to_the_native_cuda_kernels():
    """The native CUDA kernels take a CUDA torch.Generator (or None: the default) and advance it on
    the device; a CPU torch.Generator or a PhiloxGenerator gives a key drawn here, with CUDA tensors
    too; the CPU and Triton kernels always take a key."""
    cuda = torch.device("cuda")
    assert not takes_cuda_generator(torch.Generator().manual_seed(3), cuda)
    assert not takes_cuda_generator(PhiloxGenerator(3), cuda)
    assert takes_cuda_generator(None, cuda) and not takes_cuda_generator(None, torch.device("cpu"))
    generator, key = kernel_noise_key(torch.Generator().manual_seed(3), cuda, "native")
    assert generator is None and key[0] == 3
    assert kernel_noise_key(PhiloxGenerator(7), cuda, "native") == (None, (7, 0))
    assert kernel_noise_key(PhiloxGenerator(7), torch.device("cpu"), "triton") == (None, (7, 0))


def test_cpu_generator_keys_are_reproducible_and_distinct():
    g = torch.Generator().manual_seed(11)
    first, second = next_philox_key(g, torch.device("cpu")), next_philox_key(g, torch.device("cpu"))
    assert first != second and first[0] == second[0] == 11
    g.manual_seed(11)
    assert next_philox_key(g, torch.device("cpu")) == first
