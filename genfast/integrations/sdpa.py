"""genfast.attention in place of torch.nn.functional.scaled_dot_product_attention, for code that
calls SDPA itself: nanoGPT-style models, timm's vision transformers, torch.nn.MultiheadAttention
and nn.Transformer* layers in training, diffusers' default attention processor.

    import genfast.integrations.sdpa as genfast_sdpa
    genfast_sdpa.patch()                    # every later F.scaled_dot_product_attention call
    with genfast_sdpa.patched(): ...        # or within a block
    genfast_sdpa.unpatch()

The patch replaces the function in torch.nn.functional, which callers look up when they call it
(F.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention, and
MultiheadAttention's functional code); a name imported before patch() (`from torch.nn.functional
import scaled_dot_product_attention`) keeps torch's function.

With impl="auto", a call that genfast's fused kernels do not take goes to torch's own SDPA, as it
would have without the patch: q, k, v that are not (batch, heads, length, head_dim), nested, of
another dtype than float32, float16 and bfloat16, or beyond the GPU kernels' head dims. With a
backend named (impl="native" or "triton"), such a call raises, naming what does not fit.

Dropout draws from genfast's Philox stream (keyed by torch's default generator), not torch's: the
same distribution, other masks.
"""

import contextlib

import torch
import torch.nn.functional as F

from .. import _backend
from .._checks import FLOAT_DTYPES
from ..attention import _fused_backend, attention

torch_sdpa = F.scaled_dot_product_attention  # torch's own, called by the patch for what it does not take


def _takes(q, k, v, impl):
    """Whether genfast's fused kernels take the call (else torch's SDPA gets it, for impl="auto")."""
    tensors = (q, k, v)
    if not all(isinstance(t, torch.Tensor) and not t.is_nested and t.dim() == 4 for t in tensors):
        return False
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    return _fused_backend(impl, q, (q.shape[3], v.shape[3])) != "reference"


def sdpa_function(impl: str = "auto"):
    """A function with scaled_dot_product_attention's signature that runs genfast.attention with
    backend impl (see the module's docstring for what goes to torch's SDPA)."""
    if impl not in _backend.IMPLS or impl == "reference":
        raise ValueError(f"impl must be one of {tuple(i for i in _backend.IMPLS if i != 'reference')}, got {impl!r}")

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     enable_gqa=False, **options):
        if impl == "auto" and (options or not _takes(query, key, value, impl)):
            return torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa,
                              **options)
        if options:
            raise TypeError(f"genfast's scaled_dot_product_attention takes no {', '.join(options)}")
        return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, impl=impl)

    scaled_dot_product_attention.genfast_impl = impl
    return scaled_dot_product_attention


def patch(impl: str = "auto"):
    """Makes torch.nn.functional.scaled_dot_product_attention run genfast.attention with backend
    impl, until unpatch(); patching again replaces the backend."""
    F.scaled_dot_product_attention = sdpa_function(impl)


def unpatch():
    """Restores torch's scaled_dot_product_attention."""
    F.scaled_dot_product_attention = torch_sdpa


def is_patched() -> bool:
    return F.scaled_dot_product_attention is not torch_sdpa


@contextlib.contextmanager
def patched(impl: str = "auto"):
    """patch(impl) for the block; on leaving it, the function the block found is back."""
    previous = F.scaled_dot_product_attention
    patch(impl)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
