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
another dtype than float32, float16 and bfloat16, or beyond the GPU kernels' head dims, dropout_p
1 and head dim 0. With a backend named (impl="native" or "triton"), such a call raises, naming
what does not fit. Batch and head dims of 1 broadcast as SDPA broadcasts them (key and value of
one head read as grouped-query attention, not expanded), and torch.nn.attention.bias's causal
masks (causal_upper_left, causal_lower_right) run as genfast's causal alignments.

Dropout draws from genfast's Philox stream (keyed by torch's default generator), not torch's: the
same distribution, other masks.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, CausalVariant

from .. import _backend
from .._checks import FLOAT_DTYPES
from ..attention import _fused_backend, attention

# torch's own, called by the patch for what it does not take (F's attribute may already be another's patch)
torch_sdpa = torch._C._nn.scaled_dot_product_attention


def _takes(q, k, v, impl):
    """Whether genfast's fused kernels take the call (else torch's SDPA gets it, for impl="auto")."""
    tensors = (q, k, v)
    if not all(isinstance(t, torch.Tensor) and not t.is_nested and t.dim() == 4 for t in tensors):
        return False
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    return _fused_backend(impl, q, (q.shape[3], v.shape[3])) != "reference"


def _causal_variant(attn_mask, query, key):
    """genfast's causal alignment for a torch.nn.attention.bias causal mask of query's and key's lengths
    (a CausalBias's storage is not the mask: torch's SDPA reads its variant), None for any other mask."""
    if not isinstance(attn_mask, CausalBias):
        return None
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.shape[-2], key.shape[-2]):
        raise ValueError(f"attn_mask: a causal bias of lengths ({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) for "
                         f"queries and keys of {query.shape[-2]} and {key.shape[-2]}")
    return "top_left" if attn_mask.variant == CausalVariant.UPPER_LEFT else "bottom_right"


def _broadcast(query, key, value, enable_gqa):
    """(query, key, value, enable_gqa) with batch and head dims of 1 broadcast as SDPA broadcasts them:
    expanded views over the batch; key and value of one head as grouped-query attention (each read
    once, not expanded), other heads expanded (without enable_gqa). None where they do not broadcast."""
    dims = 1 if enable_gqa else 2
    try:
        shape = torch.broadcast_shapes(*(t.shape[:dims] for t in (query, key, value)))
    except RuntimeError:
        return None
    if not enable_gqa and key.shape[1] == value.shape[1] == 1 and query.shape[1] > 1:
        shape, enable_gqa = shape[:1], True
    return (*(t if t.shape[:len(shape)] == shape else t.expand(*shape, *t.shape[len(shape):])
              for t in (query, key, value)), enable_gqa)


def sdpa_function(impl: str = "auto"):
    """A function with scaled_dot_product_attention's signature that runs genfast.attention with
    backend impl (see the module's docstring for what goes to torch's SDPA)."""
    if impl not in _backend.IMPLS or impl == "reference":
        raise ValueError(f"impl must be one of {tuple(i for i in _backend.IMPLS if i != 'reference')}, got {impl!r}")

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     enable_gqa=False, **options):
        broadcast = _broadcast(query, key, value, enable_gqa) if _takes(query, key, value, impl) else None
        # dropout_p 1 (all dropped) and head dim 0 are torch's: genfast.attention refuses them.
        if impl == "auto" and (options or broadcast is None or dropout_p >= 1.0 or query.shape[-1] == 0):
            return torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa,
                              **options)
        if options:
            raise TypeError(f"genfast's scaled_dot_product_attention takes no {', '.join(options)}")
        causal = _causal_variant(attn_mask, query, key)
        if causal is not None:
            attn_mask = None
        if broadcast is not None:
            query, key, value, enable_gqa = broadcast
        return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal=causal,
                         impl=impl)

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
