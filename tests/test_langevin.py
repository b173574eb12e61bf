"""The fused Langevin-type updates on every backend against genfast.reference.langevin."""

import math

import pytest
import torch

import genfast
from genfast.ops import langevin_step as langevin_op
from genfast.testing.langevin_step import LANGEVIN_CASES, make_langevin_inputs, sample_of
from genfast.testing.tolerances import assert_close_elementwise
from conftest import devices, fused_impls, skip_unless_runs, skip_unless_supported

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 3, 5, 7), (1, 1), (3, 1027), (4, 8, 8)]


def _assert_matches_reference(case, impl, args, kwargs):
    result, mean = case.fn(*args, **kwargs, return_mean=True, impl=impl)
    ref, ref_mean = case.fn(*args, **kwargs, return_mean=True, impl="reference")
    x = sample_of(case, args)
    assert result.dtype == x.dtype and result.shape == x.shape
    assert_close_elementwise(result, ref)
    assert_close_elementwise(mean, ref_mean)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LANGEVIN_CASES, ids=str)
def test_matches_reference_with_given_noise(case, impl, dtype, device):
    skip_unless_supported(impl, device, dtype)
    _assert_matches_reference(case, impl, *make_langevin_inputs(case, (2, 3, 5, 7), dtype, device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", LANGEVIN_CASES, ids=str)
def test_per_sample_schedule_and_shapes(case, shape, impl, device):
    skip_unless_supported(impl, device)
    _assert_matches_reference(case, impl, *make_langevin_inputs(case, shape, device=device, per_sample_schedule=True))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("case", LANGEVIN_CASES, ids=str)
def test_in_kernel_noise_matches_reference_stream(case, impl, device):
    skip_unless_supported(impl, device)
    args, kwargs = make_langevin_inputs(case, (3, 4, 33), device=device, noise=False)
    fused = case.fn(*args, **kwargs, generator=genfast.PhiloxGenerator(99), impl=impl)
    ref = case.fn(*args, **kwargs, generator=genfast.PhiloxGenerator(99), impl="reference")
    assert_close_elementwise(fused, ref, scale=4)
    noiseless = case.fn(*args, **kwargs, noise=torch.zeros_like(args[0]), impl=impl)
    assert not torch.allclose(fused, noiseless), "in-kernel noise was not added"


@pytest.mark.parametrize("impl", fused_impls())
def test_noise_has_the_requested_scale(impl):
    skip_unless_runs(impl, "cpu")
    n = 1 << 16 if impl == "triton" else 1 << 20
    x, g = torch.zeros(4, n // 4), torch.zeros(4, n // 4)
    std = torch.tensor([0.5, 1.0, 2.0, 3.0])
    out = genfast.langevin_step(x, g, 1.0, noise_std=std, generator=genfast.PhiloxGenerator(5), impl=impl)
    measured = out.double().std(dim=1)
    torch.testing.assert_close(measured, std.double(), rtol=5 * (2 / (n // 4)) ** 0.5 * 3, atol=0)
    assert out.double().mean(dim=1).abs().max() < 5 * 3 / (n // 4) ** 0.5


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_out_in_place_and_non_contiguous(impl, device):
    skip_unless_supported(impl, device)
    case = LANGEVIN_CASES[3]  # per-sample norm clip
    args, kwargs = make_langevin_inputs(case, (4, 6, 10), device=device)
    expected = case.fn(*args, **kwargs, impl="reference")
    x = args[0].clone()
    result = case.fn(x, *args[1:], **kwargs, out=x, impl=impl)
    assert result.data_ptr() == x.data_ptr()
    assert_close_elementwise(x, expected)
    t_args = [a.transpose(1, 2).contiguous().transpose(1, 2) if torch.is_tensor(a) else a for a in args]
    t_kwargs = {k: v.transpose(1, 2).contiguous().transpose(1, 2) if torch.is_tensor(v) else v
                for k, v in kwargs.items()}
    out = torch.empty(4, 10, 6, device=device).transpose(1, 2)
    case.fn(*t_args, **t_kwargs, out=out, impl=impl)
    assert_close_elementwise(out, expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("case", LANGEVIN_CASES, ids=str)
def test_empty_tensors(case, impl, device):
    skip_unless_supported(impl, device)
    args, kwargs = make_langevin_inputs(case, (0, 3), device=device)
    assert case.fn(*args, **kwargs, impl=impl).shape == (0, 3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("case", LANGEVIN_CASES, ids=str)
def test_nan_propagates(case, impl, device):
    skip_unless_supported(impl, device)
    args, kwargs = make_langevin_inputs(case, (2, 9), device=device)
    sample_of(case, args)[0, 3] = float("nan")
    (args[0] if case.score_first else args[1])[1, 4] = float("nan")  # the score or the gradient
    result = case.fn(*args, **kwargs, impl=impl)
    ref = case.fn(*args, **kwargs, impl="reference")
    assert torch.equal(torch.isnan(result), torch.isnan(ref))
    assert torch.isnan(result[0, 3]) and torch.isnan(result[1, 4]), "NaN must never be clamped away"


def test_clipping_and_clamping_edges():
    x = torch.zeros(2, 4)
    g = torch.tensor([[3.0, -3.0, 0.25, float("inf")], [0.0, 0.0, 0.0, 0.0]])
    for impl in ["native", "reference"]:
        out = genfast.langevin_step(x, g, 1.0, noise_std=0.0, grad_clip=0.5, impl=impl)
        torch.testing.assert_close(out[0], torch.tensor([0.5, -0.5, 0.25, 0.5]))
        # a zero gradient is left alone by the norm clip (no division by zero)
        out = genfast.langevin_step(x, g[[1]].expand(2, 4).contiguous(), 1.0, noise_std=0.0, grad_norm_clip=1.0,
                                    impl=impl)
        assert torch.equal(out, torch.zeros(2, 4))
        out = genfast.langevin_step(x, torch.full((2, 4), 10.0), 1.0, noise_std=0.0, grad_norm_clip=2.0, impl=impl)
        torch.testing.assert_close(out.norm(dim=1), torch.full((2,), 2.0))
        out = genfast.langevin_step(x, torch.full((2, 4), 10.0), 1.0, noise_std=0.0, clamp=(0.0, 1.0), impl=impl)
        assert torch.equal(out, torch.ones(2, 4))
        out = genfast.langevin_step(x, g, 1.0, noise_std=0.0, clamp=(0.3, 0.3), impl=impl)
        assert torch.equal(out, torch.full((2, 4), 0.3))


def test_predictors_match_their_closed_forms():
    x, s, z = torch.randn(3, 40), torch.randn(3, 40), torch.randn(3, 40)
    sigma, sigma_next, beta, dt = 3.0, 2.0, 8.0, 1e-2
    ve = x + (sigma**2 - sigma_next**2) * s + math.sqrt(sigma**2 - sigma_next**2) * z
    vp = x * (1 + 0.5 * beta * dt) + beta * dt * s + math.sqrt(beta * dt) * z
    for impl in ["native", "reference"]:
        assert_close_elementwise(genfast.ve_sde_step(s, x, sigma, sigma_next, noise=z, impl=impl), ve, scale=4)
        assert_close_elementwise(genfast.vp_sde_step(s, x, beta, dt, noise=z, impl=impl), vp, scale=4)


BAD_INPUTS = [
    ("grad", lambda x: genfast.langevin_step(x, x[:1], 0.1), "grad must have the shape"),
    ("grad", lambda x: genfast.langevin_step(x, x.double(), 0.1), "grad must have the dtype"),
    ("x", lambda x: genfast.langevin_step(x.long(), x.long(), 0.1), "x must be float32"),
    ("step_size", lambda x: genfast.langevin_step(x, x, -0.1), "step_size must be in [0, inf]"),
    ("step_size", lambda x: genfast.langevin_step(x, x, torch.tensor([0.1, -1.0])), "step_size must be in [0, inf]"),
    ("noise_std", lambda x: genfast.langevin_step(x, x, 0.1, noise_std=-1.0), "noise_std must be in [0, inf]"),
    ("grad_clip", lambda x: genfast.langevin_step(x, x, 0.1, grad_clip=0.0), "grad_clip must be in (0, inf]"),
    ("grad_norm_clip", lambda x: genfast.langevin_step(x, x, 0.1, grad_clip=1.0, grad_norm_clip=1.0),
     "grad_clip or grad_norm_clip"),
    ("clamp", lambda x: genfast.langevin_step(x, x, 0.1, clamp=(1.0, 0.0)), "clamp must have lo <= hi"),
    ("sigma_next", lambda x: genfast.ve_sde_step(x, x, 1.0, 2.0), "sigma_next must be <= sigma"),
    ("beta", lambda x: genfast.vp_sde_step(x, x, -1.0, 0.1), "beta must be in [0, inf]"),
    ("noise", lambda x: genfast.langevin_step(x, x, 0.1, noise=torch.zeros(3)), "noise must have the shape"),
    ("step_size", lambda x: genfast.langevin_step(x, x, torch.ones(3)), "one value or one per sample"),
]


@pytest.mark.parametrize("name,call,message", BAD_INPUTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(name, call, message):
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        call(torch.randn(2, 4))
    assert message in str(info.value) and name in str(info.value)


def test_native_op_checks_arguments():
    skip_unless_runs("native", "cpu")
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="clamp_lo must be <= clamp_hi"):
        torch.ops.genfast.langevin_step(x, x, None, None, [1.0, 0.1, 0.1, 1.0], math.inf, 1.0, 0.0, False, None, 0,
                                        0, torch.empty_like(x), None)


def _op_samples(impl, device):
    x, g = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    generator = (None,) if impl == "native" else ()
    yield (x, g, torch.randn_like(x), None, [1.0, 0.1, 0.3, 1.0], 0.5, -1.0, 1.0, False, *generator, 0, 0,
           torch.empty_like(x), torch.empty_like(x))
    yield (x, g, None, torch.rand(3, 4, device=device), [0.0] * 4, math.inf, -math.inf, math.inf, True,
           *generator, 7, 4, torch.empty_like(x), None)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck(impl, device):
    skip_unless_supported(impl, device)
    op = torch.ops.genfast.langevin_step if impl == "native" else langevin_op.triton_operator(device)
    for args in _op_samples(impl, device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_schedule", "tensor_schedule"])
def test_torch_compile_fullgraph(impl, per_sample, device):
    skip_unless_supported(impl, device)
    torch._dynamo.reset()
    for case in (LANGEVIN_CASES[1], LANGEVIN_CASES[3], LANGEVIN_CASES[6]):
        args, kwargs = make_langevin_inputs(case, (2, 3, 8), device=device, per_sample_schedule=per_sample)

        def step(*a):
            return case.fn(*a, **kwargs, impl=impl)

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
        assert_close_elementwise(compiled(*args), step(*args))


@pytest.mark.cuda
def test_langevin_chain_captured_in_a_cuda_graph_draws_fresh_noise():
    skip_unless_runs("native", "cuda")
    x = torch.randn(8, 1000, device="cuda")
    step = torch.full((8,), 0.01, device="cuda")

    def chain():
        y = x.clone()
        for _ in range(4):
            genfast.langevin_step(y, -y, step, out=y, impl="native")  # a standard normal's score is -y
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = chain()
    graph.replay()
    first = result.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.allclose(first, result)


@pytest.mark.cuda
@pytest.mark.parametrize("generator", ["philox", "cpu", "triton"])
def test_host_keys_are_refused_under_cuda_graph_capture(generator):
    """A key drawn on the host (a PhiloxGenerator, a CPU torch.Generator, or any on Triton) would be
    frozen into a captured graph, every replay drawing the same noise: refused, naming what works."""
    impl = "triton" if generator == "triton" else "native"
    skip_unless_runs(impl, "cuda")
    x = torch.randn(8, 100, device="cuda")
    key = {"philox": genfast.PhiloxGenerator(1), "cpu": torch.Generator().manual_seed(1), "triton": None}[generator]
    genfast.langevin_step(x, -x, 0.01, generator=key, impl=impl)  # eagerly: fine (and compiled)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="under CUDA graph capture needs the native CUDA kernels"):
        with torch.cuda.graph(graph):
            genfast.langevin_step(x, -x, 0.01, generator=key, impl=impl)


@pytest.mark.cuda
def test_cpu_generators_key_cuda_steps():
    """A CPU torch.Generator (as diffusers pipelines often pass) keys a CUDA step's noise as on the
    CPU: the native kernels take a key drawn from it, not the generator itself; MALA's uniforms
    are drawn on the CPU and copied."""
    skip_unless_runs("native", "cuda")
    x = torch.randn(4, 64)
    on_cpu = genfast.langevin_step(x, -x, 0.01, generator=torch.Generator().manual_seed(5), impl="native")
    on_gpu = genfast.langevin_step(x.cuda(), -x.cuda(), 0.01, generator=torch.Generator().manual_seed(5), impl="native")
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)
    energy = (x * x).sum(1) / 2
    result = genfast.mala_accept(x.cuda(), x.cuda() * 0.9, -x.cuda(), -0.9 * x.cuda(), energy.cuda(),
                                 energy.cuda() * 0.81, 0.01, generator=torch.Generator().manual_seed(2))
    assert result.accepted.device.type == "cuda"


CORRECTOR_SETTINGS = [
    dict(snr=0.16),
    dict(snr=0.075, per_sample_norms=True),
    dict(snr=0.16, alpha=0.7),
    dict(snr=0.1, alpha="per_sample"),
]


def _corrector_inputs(shape, device, settings, dtype=torch.float32, noise=True):
    gen = torch.Generator().manual_seed(77)
    x, score, z = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    kwargs = dict(settings)
    if kwargs.get("alpha") == "per_sample":
        kwargs["alpha"] = torch.linspace(0.5, 1.0, shape[0], device=device)
    if noise:
        kwargs["noise"] = z
    return score, x, kwargs


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("settings", CORRECTOR_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_corrector_matches_reference(settings, dtype, impl, device):
    skip_unless_supported(impl, device, dtype)
    score, x, kwargs = _corrector_inputs((3, 4, 9, 9), device, settings, dtype)
    result, mean = genfast.langevin_corrector_step(score, x, **kwargs, return_mean=True, impl=impl)
    ref, ref_mean = genfast.langevin_corrector_step(score, x, **kwargs, return_mean=True, impl="reference")
    assert_close_elementwise(result, ref, scale=4)
    assert_close_elementwise(mean, ref_mean, scale=4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 40000), (1, 1)], ids=str)
@pytest.mark.parametrize("per_sample_norms", [False, True])
def test_corrector_in_kernel_noise_matches_reference(per_sample_norms, shape, impl, device):
    """The norms come from the noise drawn but never stored; the update draws the same noise."""
    skip_unless_supported(impl, device)
    score, x, kwargs = _corrector_inputs(shape, device, dict(snr=0.16, per_sample_norms=per_sample_norms),
                                         noise=False)
    fused = genfast.langevin_corrector_step(score, x, **kwargs, generator=genfast.PhiloxGenerator(8), impl=impl)
    ref = genfast.langevin_corrector_step(score, x, **kwargs, generator=genfast.PhiloxGenerator(8), impl="reference")
    assert_close_elementwise(fused, ref, scale=8)


def test_corrector_step_size_follows_score_sde():
    """eps = 2 alpha (snr * mean ||z|| / mean ||score||)^2, written as score_sde's LangevinCorrector writes it."""
    score, x, z = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    snr, alpha = 0.16, 0.9
    grad_norm = torch.norm(score.reshape(score.shape[0], -1), dim=-1).mean()
    noise_norm = torch.norm(z.reshape(z.shape[0], -1), dim=-1).mean()
    step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
    x_mean = x + step_size * score
    expected = x_mean + torch.sqrt(step_size * 2) * z
    for impl in ["native", "reference"]:
        result, mean = genfast.langevin_corrector_step(score, x, snr, alpha=alpha, noise=z, return_mean=True,
                                                       impl=impl)
        assert_close_elementwise(mean, x_mean, scale=4)
        assert_close_elementwise(result, expected, scale=4)


def test_corrector_bad_input():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="snr must be in"):
        genfast.langevin_corrector_step(x, x, -0.1)
    with pytest.raises(ValueError, match="alpha must hold one value or one per sample"):
        genfast.langevin_corrector_step(x, x, 0.1, alpha=torch.ones(3))
    with pytest.raises(ValueError, match="x must have a batch dimension"):
        genfast.langevin_corrector_step(x[0, 0], x[0, 0], 0.1)


@pytest.mark.parametrize("device", devices())
def test_corrector_opcheck(device):
    skip_unless_runs("native", device)
    x, s = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    alpha = torch.ones(1, device=device)
    torch.library.opcheck(torch.ops.genfast.langevin_corrector_step,
                          (x, s, torch.randn_like(x), alpha, 0.16, False, False, None, 0, 0, torch.empty_like(x),
                           torch.empty_like(x)))
    torch.library.opcheck(torch.ops.genfast.langevin_corrector_step,
                          (x, s, None, torch.rand(3, device=device), 0.1, True, True, None, 3, 8, torch.empty_like(x),
                           None))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_corrector_torch_compile_fullgraph(impl, device):
    skip_unless_supported(impl, device)
    torch._dynamo.reset()
    score, x, kwargs = _corrector_inputs((2, 3, 8), device, dict(snr=0.16, alpha="per_sample"))
    step = lambda s, y: genfast.langevin_corrector_step(s, y, **kwargs, impl=impl)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    assert_close_elementwise(compiled(score, x), step(score, x))


@pytest.mark.cuda
@pytest.mark.parametrize("impl", fused_impls())
def test_corrector_and_mala_with_more_rows_than_a_grid_axis_holds(impl):
    """Per-sample reductions put samples on the grid's first axis: 70000 particles of 2-D data."""
    skip_unless_runs(impl, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(70000, 2, device="cuda", generator=g)
    score = -x
    z = torch.randn(70000, 2, device="cuda", generator=g)
    fused = genfast.langevin_corrector_step(score, x, 0.16, per_sample_norms=True, noise=z, impl=impl)
    ref = genfast.langevin_corrector_step(score, x, 0.16, per_sample_norms=True, noise=z, impl="reference")
    assert_close_elementwise(fused, ref, scale=4)
    y = x + 0.1 * score + 0.2**0.5 * z
    energy = lambda v: 0.5 * (v**2).sum(1)  # noqa: E731
    u = torch.rand(70000, device="cuda", generator=g, dtype=torch.float64)
    got = genfast.mala_accept(x, y, score, -y, energy(x), energy(y), 0.1, uniform=u, impl=impl)
    want = genfast.mala_accept(x, y, score, -y, energy(x), energy(y), 0.1, uniform=u, impl="reference")
    assert torch.equal(got.accepted, want.accepted) and torch.equal(got.x, want.x)
