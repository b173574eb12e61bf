"""transformers' apply_rotary_pos_emb (Llama, Mistral, Qwen 2 and 3, Gemma, GPT-NeoX, Phi and the other
models that copy one of its two forms) on genfast.rotary: one pass per tensor, forward and backward,
where transformers' form runs six elementwise ops (and saves their inputs for the backward). One
line puts it into a model:

    transformers.models.llama.modeling_llama.apply_rotary_pos_emb = genfast.integrations.transformers.apply_rotary_pos_emb

(the same for each model's modeling module whose function is rotate_half's, which patch(module)
checks first: it refuses the models of GPT-J's interleaved layout, Cohere's and GLM's among them,
whose functions take the same arguments and compute something else). It takes transformers' arguments: q and k (batch,
heads, seqlen, head_dim) with unsqueeze_dim=1, or (batch, seqlen, heads, head_dim) with
unsqueeze_dim=2; cos and sin (batch or 1, seqlen, rotary_dim), of any float dtype, as the models' rotary
embedding modules return them, with the two halves of each row equal (rotate_half's layout: the
first half is read, the second is not checked). rotary_dim may be less than head_dim (GPT-NeoX's
and Phi's partial rotary form: the features past it pass unchanged). position_ids is accepted and
unused, as in transformers. Each of q and k is turned in its type promoted with cos's and sin's,
as transformers' products promote them (float32 cos and sin beside 16-bit q under autocast).
"""

from typing import Optional, Tuple

import torch

from ..rotary import rotary

Tensor = torch.Tensor

__all__ = ["apply_rotary_pos_emb", "patch"]


def _tables_and_positions(cos: Tensor, sin: Tensor, batch: int, seqlen: int):
    """cos and sin (batch or 1, seqlen, rotary_dim) as tables (rows, rotary_dim / 2), read in place,
    and the row of each token: (batch or 1, seqlen) int32."""
    if cos.dim() != 3 or sin.shape != cos.shape or cos.shape[1] != seqlen or cos.shape[0] not in (1, batch):
        raise ValueError(f"cos and sin must be (batch or 1, seqlen, rotary_dim) = ({batch} or 1, {seqlen}, *), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    half = cos.shape[2] // 2
    rows = cos.shape[0] * seqlen
    positions = torch.arange(rows, dtype=torch.int32, device=cos.device).view(cos.shape[0], seqlen)
    return cos[..., :half].reshape(rows, half), sin[..., :half].reshape(rows, half), positions


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                         unsqueeze_dim: int = 1, *, impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb: (q, k) turned, each in its own layout."""
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (q (batch, heads, seqlen, head_dim)) or 2 (q (batch, seqlen, "
                         f"heads, head_dim)), got {unsqueeze_dim}")
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor, got {tuple(x.shape)}")
        if cos.shape[-1] > x.shape[-1] or cos.shape[-1] % 2:
            raise ValueError(f"cos and sin must have an even last dim (rotary_dim) of at most {name}'s head_dim "
                             f"({x.shape[-1]}), got {tuple(cos.shape)}")
    tokens_major = [t.transpose(1, 2) if unsqueeze_dim == 1 else t for t in (q, k)]  # (batch, seqlen, heads, dim)
    if tokens_major[1].shape[:2] != tokens_major[0].shape[:2]:
        raise ValueError(f"q and k must have the same batch and seqlen, got {tuple(q.shape)} and {tuple(k.shape)}")
    table_cos, table_sin, positions = _tables_and_positions(cos, sin, *tokens_major[0].shape[:2])  # once for both
    turned = []
    for x in tokens_major:
        dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        out = rotary(x.to(dtype), table_cos.to(dtype), table_sin.to(dtype), positions, interleaved=False, impl=impl)
        turned.append(out.transpose(1, 2) if unsqueeze_dim == 1 else out)
    return turned[0], turned[1]


def patch(modeling_module):
    """Puts apply_rotary_pos_emb into a transformers modeling module (transformers.models.llama.
    modeling_llama, say) in place of its own, once a probe shows the two agree: a module of GPT-J's
    interleaved layout (Cohere's, GLM's) or of any other form raises, naming it. Returns the module's
    own function, to put back."""
    own = getattr(modeling_module, "apply_rotary_pos_emb", None)
    if own is None:
        raise ValueError(f"{modeling_module.__name__} has no apply_rotary_pos_emb")
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 3, 8, generator=g) for _ in range(2))
    angles = torch.rand(1, 3, 4, generator=g) * 6.0
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # rotate_half's tables
    expected = own(q, k, cos, sin)
    got = apply_rotary_pos_emb(q, k, cos, sin)
    if not all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(got, expected)):
        raise ValueError(f"{modeling_module.__name__}'s apply_rotary_pos_emb is not rotate_half's (an interleaved "
                         "layout, as GPT-J's?): genfast's would compute something else there")
    modeling_module.apply_rotary_pos_emb = apply_rotary_pos_emb
    return own
