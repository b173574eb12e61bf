"""diffusers schedulers whose step() runs genfast's fused kernel.

    from genfast.integrations.diffusers import DDPMScheduler        # instead of diffusers'
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

Each class subclasses diffusers' class of the same name, takes the same configuration and returns
what diffusers returns. Two constructor options come on top:
- genfast_noise="diffusers" (default) draws the step's noise exactly as diffusers does (from the
  generator passed to step(), or variance_noise), so a known seed gives the same images;
  genfast_noise="in_kernel" draws it inside the kernel instead (same distribution, another stream;
  a list of generators, one per sample, still draws diffusers' noise).
- genfast_impl: the backend, as the impl argument of genfast's functions.
Configurations the fused step does not cover (thresholding, learned variances, per-token
timesteps) fall back to diffusers' own step().

Attention: GenfastAttnProcessor for diffusers' Attention blocks (UNets, VAEs, older DiTs), and,
registered on import, the attention dispatcher's backend "genfast" for the blocks that dispatch
(Flux, SD3, Wan, QwenImage): model.set_attention_backend("genfast").
"""

import inspect

import torch

try:
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as error:  # pragma: no cover - exercised only without diffusers
    raise ImportError("genfast.integrations.diffusers needs diffusers: pip install diffusers") from error

from .. import diffusion
from .diffusers_backend import register as register_attention_backend

NOISE_MODES = ("diffusers", "in_kernel")


def _fused_scheduler(base):
    """A subclass of `base` with genfast's constructor options; its signature stays base's plus the
    two options, so that diffusers' from_config still finds every configuration key."""

    class Fused(base):
        def __init__(self, *args, genfast_noise="diffusers", genfast_impl="auto", **kwargs):
            if genfast_noise not in NOISE_MODES:
                raise ValueError(f"genfast_noise must be one of {NOISE_MODES}, got {genfast_noise!r}")
            super().__init__(*args, **kwargs)
            self.genfast_noise = genfast_noise
            self.genfast_impl = genfast_impl

        def _noise(self, shape, generator, device, dtype):
            """diffusers' noise, or None when the kernel draws it (from one generator: a list of them,
            one per sample, draws diffusers' noise)."""
            if self.genfast_noise == "in_kernel" and not isinstance(generator, (list, tuple)):
                return None
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    parameters = list(inspect.signature(base.__init__).parameters.values())
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
             for name, default in (("genfast_noise", "diffusers"), ("genfast_impl", "auto"))]
    positional = [p for p in parameters if p.kind != inspect.Parameter.VAR_KEYWORD]
    Fused.__init__.__signature__ = inspect.Signature(positional + extra)
    Fused.__name__ = Fused.__qualname__ = base.__name__
    Fused.__module__ = __name__
    return Fused


def _as_dtype_of(model_output, sample):
    """diffusers' steps return the model output's dtype; the fused step needs one dtype."""
    return model_output if model_output.dtype == sample.dtype else model_output.to(sample.dtype)


class DDPMScheduler(_fused_scheduler(diffusers.DDPMScheduler)):
    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        supported = not self.config.thresholding and self.variance_type in ("fixed_small", "fixed_large") \
            and model_output.shape == sample.shape
        if not supported:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        t = int(timestep)
        prev_t = int(self.previous_timestep(timestep))
        alpha_prod_t = float(self.alphas_cumprod[t])
        alpha_prod_t_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        add_noise = t > 0
        noise = self._noise(model_output.shape, generator, model_output.device, model_output.dtype) if add_noise else None
        prev, x0 = diffusion.ddpm_step(
            _as_dtype_of(model_output, sample), sample, alpha_prod_t, alpha_prod_t_prev,
            prediction_type=self.config.prediction_type, variance_type=self.variance_type,
            clip_sample=self.config.clip_sample, clip_sample_range=self.config.clip_sample_range, add_noise=add_noise,
            noise=None if noise is None else noise.to(sample.dtype), generator=generator, return_pred_original=True,
            impl=self.genfast_impl)
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class DDIMScheduler(_fused_scheduler(diffusers.DDIMScheduler)):
    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        if self.config.thresholding or self.num_inference_steps is None:
            return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                variance_noise, return_dict)
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = float(self.alphas_cumprod[t])
        alpha_prod_t_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else float(self.final_alpha_cumprod)
        noise = variance_noise
        if eta > 0 and noise is None:
            noise = self._noise(model_output.shape, generator, model_output.device, model_output.dtype)
        prev, x0 = diffusion.ddim_step(
            _as_dtype_of(model_output, sample), sample, alpha_prod_t, alpha_prod_t_prev, eta=eta,
            prediction_type=self.config.prediction_type, clip_sample=self.config.clip_sample,
            clip_sample_range=self.config.clip_sample_range, use_clipped_model_output=use_clipped_model_output,
            noise=None if noise is None else noise.to(sample.dtype), generator=generator, return_pred_original=True,
            impl=self.genfast_impl)
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_ddim.DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class EulerDiscreteScheduler(_fused_scheduler(diffusers.EulerDiscreteScheduler)):
    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                return_dict)  # diffusers raises its own error for integer timesteps
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self.step_index])
        sigma_next = float(self.sigmas[self.step_index + 1])
        steps = len(self.sigmas) - 1
        churns = s_churn > 0 and s_tmin <= sigma <= s_tmax
        noise = self._noise(model_output.shape, generator, model_output.device, model_output.dtype) if churns else None
        sample32 = sample.to(torch.float32)
        prev, x0 = diffusion.euler_step(
            model_output.to(torch.float32), sample32, sigma, sigma_next, prediction_type=self.config.prediction_type,
            s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, num_inference_steps=steps,
            noise=None if noise is None else noise.to(torch.float32), generator=generator,
            return_pred_original=True, impl=self.genfast_impl)
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_euler_discrete.EulerDiscreteSchedulerOutput(
            prev_sample=prev, pred_original_sample=x0)


class FlowMatchEulerDiscreteScheduler(_fused_scheduler(diffusers.FlowMatchEulerDiscreteScheduler)):
    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, per_token_timesteps=None, return_dict=True):
        if per_token_timesteps is not None or isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                per_token_timesteps, return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self.step_index])
        sigma_next = float(self.sigmas[self.step_index + 1])
        stochastic = bool(self.config.stochastic_sampling)
        noise = self._noise(sample.shape, generator, sample.device, torch.float32) if stochastic else None
        prev = diffusion.flow_match_euler_step(
            model_output.to(torch.float32), sample.to(torch.float32), sigma, sigma_next,
            stochastic_sampling=stochastic, noise=noise, generator=generator, impl=self.genfast_impl)
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return diffusers.schedulers.scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteSchedulerOutput(
            prev_sample=prev)


__all__ = ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
           "GenfastAttnProcessor", "register_attention_backend"]


class GenfastAttnProcessor:
    """An attention processor for diffusers' Attention blocks (self and cross attention, in UNets,
    DiTs and VAEs) that runs genfast.attention: the computation of diffusers' AttnProcessor2_0
    with SDPA replaced, and attn.scale as the softmax scale.

        unet.set_attn_processor(GenfastAttnProcessor())

    The blocks of diffusers' attention dispatcher (FluxAttention, SD3's and Wan's, QwenImage's:
    AttentionModuleMixin, not Attention) hold other parts and raise here, naming the route that runs
    them on genfast: the dispatcher's backend "genfast", which this module registers
    (model.set_attention_backend("genfast"); diffusers_backend.py).
    """

    def __init__(self, impl: str = "auto"):
        self.impl = impl

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        from ..attention import attention

        if not isinstance(attn, diffusers.models.attention_processor.Attention):
            raise TypeError(f"GenfastAttnProcessor runs diffusers' Attention blocks, got {type(attn).__name__}: "
                            "the blocks of diffusers' attention dispatcher run genfast's attention with "
                            "model.set_attention_backend('genfast') (registered by genfast.integrations.diffusers)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # (B, C, H, W) -> (B, H W, C)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_length = source.shape[0], source.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:  # self-attention reads the normalized states
            context = hidden_states
        else:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states

        def heads(t):  # (B, L, heads * head_dim) -> (B, heads, L, head_dim)
            return t.view(batch, t.shape[1], attn.heads, -1).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), heads(attn.to_v(context))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = attention(query, key, value, attention_mask, scale=attn.scale, impl=self.impl)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


register_attention_backend()
