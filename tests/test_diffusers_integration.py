"""genfast.integrations.diffusers against diffusers itself, over whole sampling loops."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from genfast.integrations import diffusers as fused  # noqa: E402
from conftest import devices, fused_impls, skip_unless_runs, skip_unless_supported  # noqa: E402
from genfast.attention import attention as genfast_attention  # noqa: E402
from genfast.testing.tolerances import assert_error_ratio  # noqa: E402

SHAPE = (2, 3, 8, 8)


def toy_model(sample, t):
    """A deterministic stand-in for a denoiser, nonlinear in the sample and the timestep."""
    phase = float(t) / 1000.0
    return torch.sin(sample * 1.3 + phase) * 0.8 + 0.1 * sample


def sample_loop(scheduler, steps, device, step_kwargs=None, seed=0):
    scheduler.set_timesteps(steps, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen, device=device) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(toy_model(model_input, t), t, x, generator=gen, **(step_kwargs or {})).prev_sample
    return x


CONFIGS = [
    ("DDPMScheduler", dict(), {}),
    ("DDPMScheduler", dict(prediction_type="v_prediction", variance_type="fixed_large",
                           beta_schedule="squaredcos_cap_v2"), {}),
    ("DDPMScheduler", dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.9), {}),
    ("DDIMScheduler", dict(), {}),
    ("DDIMScheduler", dict(prediction_type="v_prediction", set_alpha_to_one=False), {"eta": 0.6}),
    ("DDIMScheduler", dict(clip_sample=True), {"eta": 1.0, "use_clipped_model_output": True}),
    ("EulerDiscreteScheduler", dict(), {}),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction"), {"s_churn": 0.5}),
    ("FlowMatchEulerDiscreteScheduler", dict(), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, stochastic_sampling=True), {}),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("name,config,step_kwargs", CONFIGS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CONFIGS)])
def test_sampling_loop_matches_diffusers(name, config, step_kwargs, impl, device):
    skip_unless_runs(impl, device)
    ours = getattr(fused, name)(**config, genfast_impl=impl)
    theirs = getattr(diffusers, name)(**config)
    steps = 12
    expected = sample_loop(theirs, steps, device, step_kwargs)
    got = sample_loop(ours, steps, device, step_kwargs)
    assert got.dtype == expected.dtype
    # fp32 rounding differences compound over the loop; clipping and churn amplify them a little
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_single_step_returns_what_diffusers_returns(name):
    theirs = getattr(diffusers, name)(num_train_timesteps=1000)
    ours = getattr(fused, name).from_config(theirs.config)
    assert dict(ours.config) == dict(theirs.config)
    for s in (theirs, ours):
        s.set_timesteps(10)
    t = theirs.timesteps[3]
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    if name == "EulerDiscreteScheduler":
        for s in (theirs, ours):
            s._init_step_index(t)
    a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(1))
    b = ours.step(m, t, x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=2e-6, atol=2e-6)
    assert ours.step(m, t, x, return_dict=False)[0].shape == x.shape


def test_in_kernel_noise_mode():
    base = dict(num_train_timesteps=1000)
    ours = fused.DDPMScheduler(**base, genfast_noise="in_kernel")
    theirs = diffusers.DDPMScheduler(**base)
    a = sample_loop(ours, 10, "cpu", seed=3)
    b = sample_loop(fused.DDPMScheduler(**base, genfast_noise="in_kernel"), 10, "cpu", seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # reproducible from the step generator
    c = sample_loop(theirs, 10, "cpu", seed=3)
    assert torch.isfinite(a).all() and not torch.allclose(a, c)  # another stream than diffusers'
    with pytest.raises(ValueError, match="genfast_noise must be one of"):
        fused.DDPMScheduler(genfast_noise="curand")
    # a generator per sample keys diffusers' noise, as diffusers' own step does
    sample, model_output = torch.randn(SHAPE), torch.randn(SHAPE)
    steps = []
    for scheduler in (fused.DDPMScheduler(**base, genfast_noise="in_kernel"), diffusers.DDPMScheduler(**base)):
        scheduler.set_timesteps(10)
        generators = [torch.Generator().manual_seed(n) for n in range(SHAPE[0])]
        steps.append(scheduler.step(model_output, scheduler.timesteps[3], sample, generator=generators).prev_sample)
    torch.testing.assert_close(steps[0], steps[1])


def test_unsupported_configuration_falls_back_to_diffusers():
    config = dict(variance_type="learned_range")
    ours, theirs = fused.DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    for s in (ours, theirs):
        s.set_timesteps(5)
    t = theirs.timesteps[1]
    x, m = torch.randn(1, 3, 4, 4), torch.randn(1, 6, 4, 4)
    a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = ours.step(m, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(a, b)


# The attention processor

def _attention_block(cross: bool, image: bool):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=24 if cross else None, heads=4, dim_head=8,
                     norm_num_groups=8 if image else None, residual_connection=image, bias=True)


@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("cross,image,masked", [(False, False, False), (True, False, True), (False, True, False)])
def test_attention_processor_matches_diffusers(cross, image, masked, impl):
    from diffusers.models.attention_processor import AttnProcessor2_0

    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 32, 5, 6, generator=g) if image else torch.randn(2, 30, 32, generator=g)
    context = torch.randn(2, 11, 24, generator=g) if cross else None
    # diffusers' additive form: 0 where a token is attended, -10000 where not
    mask = torch.where(torch.rand(2, 11, generator=g) < 0.3, -1e4, 0.0) if masked else None

    def run(processor, dtype):
        b = _attention_block(cross, image).to(dtype)
        b.set_processor(processor)
        x = hidden.to(dtype).requires_grad_()
        out = b(x, encoder_hidden_states=None if context is None else context.to(dtype),
                attention_mask=None if mask is None else mask.to(dtype))
        grads = torch.autograd.grad((out.double() ** 2).sum(), [x, b.to_q.weight, b.to_k.weight, b.to_v.weight])
        return [out, *grads]

    got = run(fused.GenfastAttnProcessor(impl=impl), torch.float32)
    exact = run(AttnProcessor2_0(), torch.float64)
    low = run(AttnProcessor2_0(), torch.float32)
    for k, (a, e, lo) in enumerate(zip(got, exact, low)):
        assert_error_ratio(a, e, lo, ratio=2.0 if k == 0 else 3.0, msg=f"result {k}")


@pytest.mark.parametrize("impl", fused_impls())
def test_vae_decode_with_the_processor(impl):
    """A VAE whose mid-block attends with one head of 512 channels, as Stable Diffusion's does: its
    decode with GenfastAttnProcessor set on every block (one line) against diffusers' own."""
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor2_0

    skip_unless_supported(impl, "cpu")
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 512), latent_channels=4, norm_num_groups=8, layers_per_block=1).eval()
    attentions = [module for module in vae.modules() if hasattr(module, "set_processor") and module.heads == 1]
    assert attentions and all(module.to_q.out_features == 512 for module in attentions)
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(3))

    def decode(processor, dtype):
        vae.to(dtype).set_attn_processor(processor)
        with torch.no_grad():
            return vae.decode(z.to(dtype)).sample

    got = decode(fused.GenfastAttnProcessor(impl=impl), torch.float32)
    assert {type(p) for p in vae.attn_processors.values()} == {fused.GenfastAttnProcessor}
    exact = decode(AttnProcessor2_0(), torch.float64)
    low = decode(AttnProcessor2_0(), torch.float32)
    assert_error_ratio(got, exact, low)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                   axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(1, 6, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, 3, 16, generator=g), pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([1.0]),
                  img_ids=torch.zeros(6, 3), txt_ids=torch.zeros(3, 3))
    return model, inputs


@pytest.mark.parametrize("impl", fused_impls())
def test_dispatcher_blocks_run_through_the_sdpa_patch(impl, monkeypatch):
    """diffusers' attention dispatcher (Flux's blocks) calls torch's SDPA by its module: under
    genfast.integrations.sdpa.patched() each of its attentions runs genfast's, equal to torch's by
    the error-ratio rule. GenfastAttnProcessor refuses those blocks, naming that route."""
    import torch.nn.functional as F

    import genfast.integrations.sdpa as genfast_sdpa

    skip_unless_supported(impl, "cpu")
    model, inputs = _tiny_flux()
    with torch.no_grad():
        low = model(**inputs).sample
        exact = model.double()(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}).sample
        model.float()
        calls = []
        with genfast_sdpa.patched(impl=impl):
            genfast_function = F.scaled_dot_product_attention
            monkeypatch.setattr(F, "scaled_dot_product_attention",
                                lambda *args, **kwargs: calls.append(1) or genfast_function(*args, **kwargs))
            got = model(**inputs).sample
            monkeypatch.undo()
    assert len(calls) == 2  # one joint block, one single block
    assert_error_ratio(got, exact, low)
    model.set_attn_processor(fused.GenfastAttnProcessor(impl=impl))
    with pytest.raises(TypeError, match="set_attention_backend\\('genfast'\\)"):
        model(**inputs)


def test_dispatcher_backend_genfast_takes_masks_windows_and_lse():
    """dispatch_attention_fn(backend="genfast") on (batch, tokens, heads, dim): a (batch, keys) mask
    as the native backend reads it, and the flash backends' window_size and return_lse."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=g) for _ in range(3))
    keep = torch.rand(2, 7, generator=g) < 0.7
    keep[:, 0] = True
    got = dispatch_attention_fn(q, k, v, attn_mask=keep, backend="genfast")
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                            attn_mask=keep[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(got, want)
    o, lse = dispatch_attention_fn(q, k, v, backend="genfast", attention_kwargs=dict(window_size=(2, 0),
                                                                                      return_lse=True))
    want = genfast_attention(*(t.transpose(1, 2) for t in (q, k, v)), window=(2, 0), return_lse=True,
                             impl="reference")
    torch.testing.assert_close(o, want[0].transpose(1, 2))
    torch.testing.assert_close(lse, want[1])


@pytest.mark.parametrize("impl", fused_impls())
def test_dispatcher_backend_genfast_runs_every_block(impl, monkeypatch):
    """diffusers' attention dispatcher with the backend genfast.integrations.diffusers registers:
    model.set_attention_backend("genfast") (and the attention_backend context) run each of Flux's
    attentions on genfast.attention, equal to diffusers' native backend by the error-ratio rule."""
    from diffusers.models import attention_dispatch

    from genfast.integrations import diffusers_backend

    skip_unless_supported(impl, "cpu")
    model, inputs = _tiny_flux()
    registry = attention_dispatch._AttentionBackendRegistry
    active = registry._active_backend
    calls = []
    monkeypatch.setattr(diffusers_backend, "attention",
                        lambda *args, **kwargs: calls.append(kwargs["impl"]) or genfast_attention(*args, **kwargs))
    try:
        with torch.no_grad():
            low = model(**inputs).sample
            exact = model.double()(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}).sample
            model.float()
            assert fused.register_attention_backend(impl) == "genfast"
            model.set_attention_backend("genfast")
            got = model(**inputs).sample
            model.reset_attention_backend()
            registry.set_active_backend(active)
            with attention_dispatch.attention_backend("genfast"):
                again = model(**inputs).sample
    finally:
        registry.set_active_backend(active)
        fused.register_attention_backend()
    assert calls == [impl] * 4  # one joint block and one single block, twice
    assert_error_ratio(got, exact, low)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
