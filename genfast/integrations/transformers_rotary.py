"""transformers' apply_rotary_pos_emb (Llama, Mistral, Qwen 2 and 3, Gemma, GPT-NeoX, Phi and the other
models that copy one of its two forms) on genfast.rotary: one pass per tensor, forward and backward,
where transformers' form runs six elementwise ops (and saves their inputs for the backward). One
line puts it into a model:

    transformers.models.llama.modeling_llama.apply_rotary_pos_emb = genfast.integrations.transformers.apply_rotary_pos_emb

(the same for each model's modeling module). It takes transformers' arguments: q and k (batch,
heads, seqlen, head_dim) with unsqueeze_dim=1, or (batch, seqlen, heads, head_dim) with
unsqueeze_dim=2; cos and sin (batch or 1, seqlen, rotary_dim) in q's dtype, as the models' rotary
embedding modules return them, with the two halves of each row equal (rotate_half's layout: the
first half is read, the second is not checked). rotary_dim may be less than head_dim (GPT-NeoX's
and Phi's partial rotary form: the features past it pass unchanged). position_ids is accepted and
unused, as in transformers.
"""

from typing import Optional, Tuple

import torch

from ..rotary import rotary

Tensor = torch.Tensor

__all__ = ["apply_rotary_pos_emb"]


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
        out = rotary(x, table_cos, table_sin, positions, interleaved=False, impl=impl)
        turned.append(out.transpose(1, 2) if unsqueeze_dim == 1 else out)
    return turned[0], turned[1]
