"""The fused denoise step on every backend against genfast.reference.diffusion."""

import math

import pytest
import torch

import genfast
from genfast.ops import denoise_step as denoise_op
from conftest import devices, fused_impls, skip_unless_runs, skip_unless_supported
from genfast.testing.denoise_step import DENOISE_CASES, SHAPES, STOCHASTIC_CASES, make_denoise_inputs
from genfast.testing.tolerances import assert_close_elementwise

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(case, impl, args, kwargs):
    if case.pred_original:
        return case.fn(*args, **kwargs, return_pred_original=True, impl=impl)
    return case.fn(*args, **kwargs, impl=impl), None


def _assert_matches_reference(case, impl, args, kwargs):
    prev, x0 = _run(case, impl, args, kwargs)
    ref_prev, ref_x0 = _run(case, "reference", args, kwargs)
    assert prev.dtype == args[1].dtype and prev.shape == args[1].shape
    assert_close_elementwise(prev, ref_prev)
    if x0 is not None:
        assert_close_elementwise(x0, ref_x0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DENOISE_CASES, ids=str)
def test_matches_reference_with_given_noise(case, impl, dtype, device):
    skip_unless_supported(impl, device, dtype)
    _assert_matches_reference(case, impl, *make_denoise_inputs(case, (2, 3, 5, 7), dtype, device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", DENOISE_CASES, ids=str)
def test_per_sample_schedule_and_shapes(case, shape, impl, device):
    skip_unless_supported(impl, device)
    _assert_matches_reference(case, impl, *make_denoise_inputs(case, shape, device=device, per_sample_schedule=True))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("case", STOCHASTIC_CASES, ids=str)
def test_in_kernel_noise_matches_reference_stream(case, impl, device):
    skip_unless_supported(impl, device)
    args, kwargs = make_denoise_inputs(case, (3, 4, 33), device=device, noise=False)
    fused = case.fn(*args, **kwargs, generator=genfast.PhiloxGenerator(2024), impl=impl)
    ref = case.fn(*args, **kwargs, generator=genfast.PhiloxGenerator(2024), impl="reference")
    # the reference's normals come from torch's float64 log/sin/cos, the kernels' from polynomials
    assert_close_elementwise(fused, ref, scale=4)
    deterministic = case.fn(*args, **kwargs, noise=torch.zeros_like(args[1]), impl=impl)
    assert not torch.allclose(fused, deterministic), "in-kernel noise was not added"


@pytest.mark.parametrize("impl", fused_impls())
def test_cpu_and_triton_give_the_same_noise_for_one_seed(impl):
    skip_unless_runs(impl, "cpu")
    case = STOCHASTIC_CASES[0]
    args, kwargs = make_denoise_inputs(case, (5, 1001), noise=False)
    generator = genfast.PhiloxGenerator(7)
    first = case.fn(*args, **kwargs, generator=generator, impl=impl)
    second = case.fn(*args, **kwargs, generator=generator, impl=impl)
    assert generator.get_offset() == 8
    assert not torch.allclose(first, second), "each call must draw fresh noise"
    again = case.fn(*args, **kwargs, generator=genfast.PhiloxGenerator(7), impl=impl)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    ref = case.fn(*args, **kwargs, generator=genfast.PhiloxGenerator(7), impl="reference")
    assert_close_elementwise(first, ref, scale=4)


def test_cpu_torch_generator_is_reproducible():
    case = STOCHASTIC_CASES[0]
    args, kwargs = make_denoise_inputs(case, (2, 64), noise=False)
    g = torch.Generator().manual_seed(5)
    first = case.fn(*args, **kwargs, generator=g)
    second = case.fn(*args, **kwargs, generator=g)
    g.manual_seed(5)
    torch.testing.assert_close(case.fn(*args, **kwargs, generator=g), first, rtol=0, atol=0)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_out_in_place_and_non_contiguous(impl, device):
    skip_unless_supported(impl, device)
    case = DENOISE_CASES[4]  # DDIM with eta, clip, v-prediction
    args, kwargs = make_denoise_inputs(case, (4, 6, 10), device=device)
    expected = case.fn(*args, **kwargs, impl="reference")

    sample_copy = args[1].clone()
    result = case.fn(args[0], sample_copy, *args[2:], **kwargs, out=sample_copy, impl=impl)
    assert result.data_ptr() == sample_copy.data_ptr()
    assert_close_elementwise(sample_copy, expected)

    # Transposed views for every input and for out.
    t_args = [a.transpose(1, 2).contiguous().transpose(1, 2) if torch.is_tensor(a) else a for a in args]
    t_kwargs = {k: v.transpose(1, 2).contiguous().transpose(1, 2) if torch.is_tensor(v) else v
                for k, v in kwargs.items()}
    assert not t_args[1].is_contiguous()
    out = torch.empty_like(t_args[1])
    case.fn(*t_args, **t_kwargs, out=out, impl=impl)
    assert_close_elementwise(out, expected)
    strided_out = torch.empty(4, 10, 6, device=device).transpose(1, 2)
    case.fn(*args, **kwargs, out=strided_out, impl=impl)
    assert_close_elementwise(strided_out, expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("case", DENOISE_CASES[:6], ids=str)
def test_empty_tensors(case, impl, device):
    skip_unless_supported(impl, device)
    args, kwargs = make_denoise_inputs(case, (0, 3), device=device)
    prev, _ = _run(case, impl, args, kwargs)
    assert prev.shape == (0, 3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("case", DENOISE_CASES, ids=str)
def test_nan_propagates(case, impl, device):
    skip_unless_supported(impl, device)
    args, kwargs = make_denoise_inputs(case, (2, 9), device=device)
    args[1][0, 3] = float("nan")  # sample
    args[0][1, 4] = float("nan")  # model output
    prev, _ = _run(case, impl, args, kwargs)
    ref, _ = _run(case, "reference", args, kwargs)
    assert torch.equal(torch.isnan(prev), torch.isnan(ref))
    assert torch.isnan(prev[1, 4]), "NaN in the model output must reach the result (never clamped away)"


def test_clip_does_not_hide_nan():
    x = torch.tensor([[float("nan"), 5.0, -5.0, 0.5]])
    m = torch.zeros_like(x)
    for impl in ["native", "reference"]:
        _, x0 = genfast.ddim_step(m, x, 0.5, 0.7, clip_sample=True, return_pred_original=True, impl=impl)
        assert torch.isnan(x0[0, 0]) and x0[0, 1] == 1.0 and x0[0, 2] == -1.0


BAD_INPUTS = [
    ("model_output", lambda m, x: genfast.ddpm_step(m[:1], x, 0.5, 0.6), "model_output must have the shape"),
    ("model_output", lambda m, x: genfast.ddpm_step(m.half(), x, 0.5, 0.6), "model_output must have the dtype"),
    ("sample", lambda m, x: genfast.ddpm_step(m.long(), x.long(), 0.5, 0.6), "sample must be float32"),
    ("alpha_prod_t", lambda m, x: genfast.ddpm_step(m, x, 1.5, 0.6), "alpha_prod_t must be in (0, 1]"),
    ("alpha_prod_t", lambda m, x: genfast.ddim_step(m, x, 0.0, 0.6), "alpha_prod_t must be in (0, 1]"),
    ("alpha_prod_t_prev", lambda m, x: genfast.ddim_step(m, x, 0.5, torch.tensor([0.5, -0.1])),
     "alpha_prod_t_prev must be in (0, 1]"),
    ("eta", lambda m, x: genfast.ddim_step(m, x, 0.5, 0.6, eta=-0.1), "eta must be in [0, inf]"),
    ("prediction_type", lambda m, x: genfast.ddim_step(m, x, 0.5, 0.6, prediction_type="x0"), "prediction_type"),
    ("variance_type", lambda m, x: genfast.ddpm_step(m, x, 0.5, 0.6, variance_type="learned"), "variance_type"),
    ("sigma", lambda m, x: genfast.euler_step(m, x, 0.0, 0.0), "sigma must be in (0, inf]"),
    ("num_inference_steps", lambda m, x: genfast.euler_step(m, x, 1.0, 0.5, s_churn=1.0), "num_inference_steps"),
    ("alpha_prod_t", lambda m, x: genfast.ddpm_step(m, x, torch.tensor([0.5, 0.5, 0.5]), 0.6), "one value or one per sample"),
    ("noise", lambda m, x: genfast.ddpm_step(m, x, 0.5, 0.6, noise=torch.zeros(3)), "noise must have the shape"),
    ("out", lambda m, x: genfast.ddpm_step(m, x, 0.5, 0.6, out=torch.zeros(2, 4, dtype=torch.float64)), "out must have the dtype"),
    ("guidance_scale", lambda m, x: genfast.ddim_step(m, x, 0.5, 0.6, model_output_cond=m), "guidance_scale is required"),
    ("impl", lambda m, x: genfast.ddim_step(m, x, 0.5, 0.6, impl="cudnn"), "impl must be one of"),
    ("clip_sample_range", lambda m, x: genfast.ddpm_step(m, x, 0.5, 0.6, clip_sample=True,
                                                         clip_sample_range=torch.tensor(2.0)), "must be a float"),
]


@pytest.mark.parametrize("name,call,message", BAD_INPUTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(name, call, message):
    m, x = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        call(m, x)
    assert message in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_euler_without_churn_draws_no_noise(impl):
    """s_churn = 0 adds no noise whether sigma is a float or a tensor: the generator does not advance,
    and the two agree."""
    skip_unless_supported(impl, "cpu")
    m, x = torch.randn(2, 8), torch.randn(2, 8)
    generator = genfast.PhiloxGenerator(3)
    by_float = genfast.euler_step(m, x, 1.5, 0.9, generator=generator, impl=impl)
    by_tensor = genfast.euler_step(m, x, torch.tensor([1.5, 1.5]), torch.tensor([0.9, 0.9]), generator=generator,
                                   impl=impl)
    assert generator.get_offset() == 0
    torch.testing.assert_close(by_tensor, by_float, rtol=1e-6, atol=1e-6)


def test_native_op_checks_arguments():
    skip_unless_runs("native", "cpu")
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="model_output must have the shape of sample"):
        torch.ops.genfast.denoise_step(x, x[:1], None, None, None, None, [0.0] * 9, False, 0.0, 0.0, False, None, 0,
                                       0, torch.empty_like(x), None)
    with pytest.raises(RuntimeError, match="row_coefs must have one row or one per sample"):
        torch.ops.genfast.denoise_step(x, x, None, None, None, torch.zeros(3, 9), [0.0] * 9, False, 0.0, 0.0, False,
                                       None, 0, 0, torch.empty_like(x), None)


def _op_samples(impl, device):
    """Arguments of the operator; the native one takes a generator (None here) before seed and offset."""
    x, m = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    coefs = [1.0, 1.2, -0.4, 0.0, 0.3, 0.7, 0.1, 0.2, 0.0]
    row_coefs = torch.randn(3, 9, device=device)
    generator = (None,) if impl == "native" else ()
    yield (x, m, None, None, torch.randn_like(x), None, coefs, True, -1.0, 1.0, False, *generator, 0, 0,
           torch.empty_like(x), torch.empty_like(x))
    yield (x, m, torch.randn_like(x), torch.randn_like(x), None, row_coefs, coefs, False, 0.0, 0.0, True, *generator,
           11, 8, torch.empty_like(x), None)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck(impl, device):
    skip_unless_supported(impl, device)
    op = torch.ops.genfast.denoise_step if impl == "native" else denoise_op.triton_operator(device)
    for args in _op_samples(impl, device):
        torch.library.opcheck(op, args)


@pytest.mark.triton
def test_triton_op_form_runs_eagerly_on_the_cpu():
    """The triton_op used on GPUs, run eagerly under the interpreter (its opcheck and compile run on the GPU)."""
    from genfast.kernels.denoise_step import denoise_step_kernel

    try:
        torch.library.wrap_triton(denoise_step_kernel)
    except RuntimeError as error:  # torch 2.11's takes triton.jit's kernels only, not the interpreter's
        pytest.skip(f"this torch's wrap_triton does not take interpreted kernels: {error}")
    for args in _op_samples("triton", "cpu"):
        expected, got = args[-2].clone(), args[-2].clone()
        torch.ops.genfast.denoise_step_triton_interpreted(*args[:-2], expected, None)
        torch.ops.genfast.denoise_step_triton(*args[:-2], got, None)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_generator_keys_the_native_kernel_like_python():
    skip_unless_runs("native", "cuda")
    case = STOCHASTIC_CASES[0]
    args, kwargs = make_denoise_inputs(case, (3, 1000), device="cuda", noise=False)
    g = torch.Generator("cuda").manual_seed(17)
    fused = case.fn(*args, **kwargs, generator=g, impl="native")
    assert g.get_offset() == 4
    ref = case.fn(*args, **kwargs, generator=genfast.PhiloxGenerator(17), impl="reference")
    assert_close_elementwise(fused, ref, scale=4)


@pytest.mark.cuda
def test_sampling_loop_captured_in_a_cuda_graph_draws_fresh_noise():
    skip_unless_runs("native", "cuda")
    x = torch.randn(4, 3, 16, 16, device="cuda")
    eps = torch.randn_like(x)
    schedule = torch.linspace(0.3, 0.6, 6, device="cuda")  # tensors: nothing is read on the host
    torch.cuda.manual_seed(0)

    def loop():
        y = x.clone()
        for i in range(5):
            genfast.ddpm_step(eps, y, schedule[i], schedule[i + 1], out=y, impl="native")
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = loop()
    graph.replay()
    first = result.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(first).all()
    assert not torch.allclose(first, result), "each replay must draw new noise"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_schedule", "tensor_schedule"])
def test_torch_compile_fullgraph(impl, per_sample, device):
    skip_unless_supported(impl, device)
    torch._dynamo.reset()
    for case in (DENOISE_CASES[1], DENOISE_CASES[4], DENOISE_CASES[8], DENOISE_CASES[14]):
        args, kwargs = make_denoise_inputs(case, (2, 3, 8), device=device, per_sample_schedule=per_sample)

        def step(*a):
            return case.fn(*a, **kwargs, impl=impl)

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
        assert_close_elementwise(compiled(*args), step(*args))


@pytest.mark.parametrize("impl", fused_impls())
def test_compiled_in_kernel_noise_with_philox_generator(impl):
    skip_unless_runs(impl, "cpu")
    skip_unless_supported(impl, "cpu")
    torch._dynamo.reset()
    case = STOCHASTIC_CASES[0]
    args, kwargs = make_denoise_inputs(case, (2, 16), noise=False)
    g_eager, g_compiled = genfast.PhiloxGenerator(3), genfast.PhiloxGenerator(3)
    compiled = torch.compile(lambda *a: case.fn(*a, **kwargs, generator=g_compiled, impl=impl), fullgraph=True,
                             backend="aot_eager")
    for _ in range(2):
        assert_close_elementwise(compiled(*args), case.fn(*args, **kwargs, generator=g_eager, impl=impl))


def test_euler_churn_matches_closed_form():
    """With epsilon prediction and churn, Euler is x + churn * z + (sigma_next - sigma_hat) * m."""
    x, m, z = torch.randn(2, 50), torch.randn(2, 50), torch.randn(2, 50)
    sigma, sigma_next, s_churn, steps = 3.0, 2.0, 1.0, 10
    gamma = min(s_churn / steps, math.sqrt(2) - 1)
    sigma_hat = sigma * (1 + gamma)
    expected = x + z * math.sqrt(sigma_hat**2 - sigma**2) + (sigma_next - sigma_hat) * m
    for impl in ["native", "reference"]:
        got = genfast.euler_step(m, x, sigma, sigma_next, s_churn=s_churn, num_inference_steps=steps, noise=z,
                                 impl=impl)
        assert_close_elementwise(got, expected)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("impl", fused_impls())
def test_more_than_two_to_the_31_elements(impl):
    """Index arithmetic is 64-bit: the last elements of a 2^31 + 5 element tensor are written."""
    skip_unless_runs(impl, "cuda")
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    n = 2**31 + 5
    x = torch.zeros(n, device="cuda", dtype=torch.float16)
    v = torch.ones_like(x)
    out = torch.full_like(x, float("nan"))
    genfast.flow_match_euler_step(v, x, 1.0, 0.5, out=out, impl=impl)
    assert torch.equal(out[-8:], torch.full((8,), -0.5, device="cuda", dtype=torch.float16))
    assert not torch.isnan(out).any()
    del x, v, out
    torch.cuda.empty_cache()


@pytest.mark.slow
def test_large_outputs_written_with_streaming_stores():
    """Outputs of 32 MiB and more take the CPU kernel's streaming-store path where their pages are
    resident (a given output written before, also misaligned); new outputs and in-place steps store
    plainly."""
    skip_unless_runs("native", "cpu")
    case = DENOISE_CASES[4]
    args, kwargs = make_denoise_inputs(case, (2, 4_200_003))
    expected, expected_x0 = _run(case, "reference", args, kwargs)
    prev, x0 = _run(case, "native", args, kwargs)
    assert_close_elementwise(prev, expected)
    assert_close_elementwise(x0, expected_x0)
    storage = torch.full((2 * 4_200_003 + 1,), float("nan"))
    misaligned = storage[1:].view(2, 4_200_003)
    assert genfast._C.pages_resident(misaligned.data_ptr(), misaligned.numel() * 4)
    case.fn(*args, **kwargs, out=misaligned, impl="native")
    assert_close_elementwise(misaligned, expected)
    in_place = args[1].clone()
    case.fn(args[0], in_place, *args[2:], **kwargs, out=in_place, impl="native")
    assert_close_elementwise(in_place, expected)
