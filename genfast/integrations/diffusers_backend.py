"""genfast's attention as a backend of diffusers' attention dispatcher (dispatch_attention_fn, which
the blocks of Flux, SD3, Wan, QwenImage and later models call): importing
genfast.integrations.diffusers registers it as "genfast",

    import genfast.integrations.diffusers
    pipe.transformer.set_attention_backend("genfast")      # or: with attention_backend("genfast"):

diffusers' backend names are an Enum it fills when imported; "genfast" is added to it as diffusers'
own names are, so that set_attention_backend and attention_backend find it."""

import torch

from ..attention import attention

try:
    from diffusers.models import attention_dispatch
except ImportError:  # diffusers before 0.35 has no dispatcher
    attention_dispatch = None

NAME = "genfast"
_options = {"impl": "auto"}


def _backend_name():
    """diffusers' AttentionBackendName member "genfast", added to the Enum where it is not yet."""
    names = attention_dispatch.AttentionBackendName
    if NAME not in names._value2member_map_:
        member = str.__new__(names, NAME)
        member._name_, member._value_ = NAME.upper(), NAME
        member.__objclass__ = names
        names._member_map_[member._name_] = member
        names._value2member_map_[NAME] = member
        names._member_names_.append(member._name_)
    return names(NAME)


def _genfast_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                       dropout_p: float = 0.0, is_causal: bool = False, scale=None, enable_gqa: bool = False,
                       window_size=(-1, -1), return_lse: bool = False, _parallel_config=None):
    """The dispatcher's call, as its native backend takes it: q, k, v (batch, tokens, heads, dim); a
    (batch, keys) mask for every query and head; window_size as flash_attn's (the flash backends').
    Returns (batch, tokens, heads, dim_v), with lse (batch, heads, tokens) as the flash backend does."""
    if _parallel_config is not None:
        raise NotImplementedError("the genfast attention backend has no context parallelism: set a backend that "
                                  "has (diffusers' 'native' or 'flash') for a parallel_config")
    if attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
        attn_mask = attn_mask[:, None, None, :]
    window = None if tuple(window_size) == (-1, -1) else tuple(window_size)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    result = attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window=window,
                       return_lse=return_lse, impl=_options["impl"])
    if return_lse:
        return result[0].transpose(1, 2), result[1]
    return result.transpose(1, 2)


def register(impl: str = "auto"):
    """Registers (again, with another impl) genfast.attention with `impl` as diffusers' attention
    backend "genfast"; returns the backend's name, or None without diffusers' dispatcher."""
    if attention_dispatch is None:
        return None
    _options["impl"] = impl
    registry = attention_dispatch._AttentionBackendRegistry
    checks = [getattr(attention_dispatch, name) for name in ("_check_device", "_check_shape")
              if hasattr(attention_dispatch, name)]
    registry.register(_backend_name(), constraints=checks)(_genfast_attention)
    return NAME
