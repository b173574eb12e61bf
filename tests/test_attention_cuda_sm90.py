"""The Hopper attention kernels (wgmma, kernels/cuda/attention_forward_sm90.cu and
attention_backward_sm90.cu) on an sm_90 GPU, opted into with GENFAST_ATTENTION_SM90=1: layout probes
first, then test_attention_cuda's native cases again (dense aligned inputs take the warp-specialized
TMA forward and key-block backward, packed and strided ones the cp.async kernels), and profiles
showing which kernels ran.
Skips without an sm_90 GPU or a build with sm_90a."""

import pytest
import torch

import genfast
import test_attention_cuda as cuda_tests
from genfast.testing.attention_probes import score_probe, value_probe
from test_attention import _compare, _qkv

pytestmark = pytest.mark.cuda

NATIVE = [("native", torch.float16), ("native", torch.bfloat16)]
IDS = ["native-fp16", "native-bf16"]


@pytest.fixture(autouse=True)
def hopper_kernel(monkeypatch):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    if not genfast.build_info().get("attention_sm90"):
        pytest.skip("this build has no sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)")
    monkeypatch.setenv("GENFAST_ATTENTION_SM90", "1")


def _kernels_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in profile.events()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_hopper_kernels_run(dtype, monkeypatch):
    q, k, v = cuda_tests._cuda(*_qkv(2, 4, 4, 300, 500, 128, dtype))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    names = _kernels_run(lambda: torch.autograd.grad(genfast.attention(*leaves, impl="native").sum(), leaves))
    for kernel in ("attention_forward_sm90_tma_kernel", "attention_backward_kv_sm90_tma_kernel",
                   "attention_backward_q_sm90_kernel"):
        assert any(kernel in name for name in names), (kernel, names)
    odd = torch.zeros(2, 4, 300, 101, dtype=dtype, device="cuda")[..., :100]  # rows 202 bytes apart: no TMA
    odd.copy_(q[..., :100])
    odd.requires_grad_()
    names = _kernels_run(lambda: torch.autograd.grad(genfast.attention(odd, k[..., :100], v, impl="native").sum(),
                                                     odd))
    assert any("attention_forward_sm90_kernel" in name for name in names), names
    assert any("attention_backward_kv_sm90_kernel" in name for name in names), names
    # The non-plain head-dim-128 variant of the key-block backward copies with cp.async (fewer spills).
    names = _kernels_run(lambda: torch.autograd.grad(genfast.attention(*leaves, impl="native", softcap=30.0).sum(),
                                                     leaves))
    assert any("attention_backward_kv_sm90_kernel" in name for name in names), names
    # Head dim 256: the forward on the Hopper kernels (key blocks of 80), the warp-specialized one
    # unless the scores need more than scaling (then the cp.async one, whose threads have more
    # registers); the backward on the d256 key-block kernel (dQ by atomics), and deterministic also
    # on the d256 query-block kernel.
    wide = [t.clone().requires_grad_() for t in cuda_tests._cuda(*_qkv(1, 2, 2, 200, 300, 256, dtype))]
    names = _kernels_run(lambda: torch.autograd.grad(genfast.attention(*wide, impl="native").sum(), wide))
    assert any("attention_forward_sm90_tma_kernel" in name for name in names), names
    assert any("attention_backward_kv_sm90_d256_kernel" in name for name in names), names
    assert not any("attention_backward_q_sm90_d256_kernel" in name for name in names), names
    names = _kernels_run(lambda: torch.autograd.grad(
        genfast.attention(*wide, impl="native", deterministic=True).sum(), wide))
    for kernel in ("attention_backward_kv_sm90_d256_kernel", "attention_backward_q_sm90_d256_kernel"):
        assert any(kernel in name for name in names), (kernel, names)
    names = _kernels_run(lambda: genfast.attention(*wide, impl="native", softcap=30.0))
    assert any("attention_forward_sm90_kernel" in name for name in names), names
    monkeypatch.setenv("GENFAST_ATTENTION_SM90", "0")
    names = _kernels_run(lambda: genfast.attention(q, k, v, impl="native"))
    assert not any("attention_forward_sm90" in name for name in names), names


def _padded(t):
    """t in rows one element longer: 2-byte-aligned rows, which TMA cannot load."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    wide[..., :-1] = t
    return wide[..., :-1]


@pytest.mark.parametrize("kernel", ["tma", "cp.async"])
@pytest.mark.parametrize("probe", [score_probe, value_probe])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layout_probes(dtype, probe, kernel):
    """Run first: which queries, keys or value rows each Hopper kernel gets wrong (a swizzle,
    descriptor, fragment or TMA coordinate mistake shows as a pattern here)."""
    prepare = (lambda t: t) if kernel == "tma" else _padded

    def run(q, k, v, scale):
        return genfast.attention(prepare(q), prepare(k), prepare(v), scale=scale, impl="native")

    assert probe(run, dtype, "cuda") == ""


@pytest.mark.parametrize("lq,lk", [(1, 1), (17, 17), (1000, 1000), (100, 333), (333, 100), (129, 257)])
@pytest.mark.parametrize("dim", [16, 40, 64, 96, 128, 200, 256])
@pytest.mark.parametrize("impl,dtype", NATIVE, ids=IDS)
def test_matches_reference(impl, dtype, dim, lq, lk):
    cuda_tests.test_matches_reference(impl, dtype, dim, lq, lk)


@pytest.mark.parametrize("lk", cuda_tests.DROPOUT_MASK_KEYS)
@pytest.mark.parametrize("impl,dtype", NATIVE, ids=IDS)
def test_dropout_keeps_exactly_the_reference_elements(impl, dtype, lk):
    cuda_tests.test_dropout_keeps_exactly_the_reference_elements(impl, dtype, lk)


@pytest.mark.parametrize("options", cuda_tests.OPTIONS, ids=str)
@pytest.mark.parametrize("impl,dtype", NATIVE, ids=IDS)
def test_options_and_gradients(impl, dtype, options):
    cuda_tests.test_options_and_gradients(impl, dtype, options)


@pytest.mark.parametrize("dim,v_dim", [(16, 16), (40, 40), (96, 96), (64, 32), (40, 72), (33, 17), (128, 64),
                                       (256, 256), (192, 128)])
@pytest.mark.parametrize("impl,dtype", NATIVE, ids=IDS)
def test_gradients_per_head_dim(impl, dtype, dim, v_dim):
    cuda_tests.test_gradients_per_head_dim(impl, dtype, dim, v_dim)


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("impl,dtype", NATIVE, ids=IDS)
def test_deterministic_and_atomic_gradients(impl, dtype, dim, monkeypatch):
    cuda_tests.test_deterministic_and_atomic_gradients(impl, dtype, dim, monkeypatch)


@pytest.mark.parametrize("ask", ["keyword", "torch"])
@pytest.mark.parametrize("impl,dtype", NATIVE, ids=IDS)
def test_backward_is_bit_reproducible(impl, dtype, ask):
    cuda_tests.test_backward_is_bit_reproducible(impl, dtype, ask)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("impl,dtype", NATIVE, ids=IDS)
def test_masks_and_their_gradients(impl, dtype, kind):
    cuda_tests.test_masks_and_their_gradients(impl, dtype, kind)


@pytest.mark.parametrize("impl,dtype", NATIVE, ids=IDS)
def test_strided_inputs_nan_long_causal_varlen_and_graphs(impl, dtype):
    cuda_tests.test_strided_inputs(impl, dtype)
    cuda_tests.test_offsets_past_two_to_the_31(impl, dtype)
    cuda_tests.test_nan_propagates(impl, dtype)
    cuda_tests.test_long_causal(impl, dtype)
    cuda_tests.test_varlen(impl, dtype)
    cuda_tests.test_cuda_graph_capture(impl, dtype)


@pytest.mark.parametrize("impl,dtype", NATIVE, ids=IDS)
def test_long_sequence_bf16_training_shape(impl, dtype):
    """The benchmark's shape class: 8k keys, head dim 128, causal and not."""
    q, k, v = cuda_tests._cuda(*_qkv(1, 4, 4, 8192, 8192, 128, dtype))
    _compare(q, k, v, impl=impl)
    _compare(q, k, v, impl=impl, causal="top_left")
