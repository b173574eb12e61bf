"""FlashAttention's padding helpers (flash_attn.bert_padding), which code calling
flash_attn_varlen_func uses to pack a padded batch and to pad the result back, in plain PyTorch:

    from flash_attn.bert_padding import pad_input, unpad_input
    from genfast.integrations.flash_attn import pad_input, unpad_input

FlashAttention 2.7's signatures and returns: unpad_input gives (tokens, indices, cu_seqlens,
max_seqlen, used_seqlens). Like FlashAttention's, it reads the longest sequence's length on the host
(max_seqlen is an int): a synchronisation on a GPU, which callers that already know it avoid by
building cu_seqlens themselves. All are differentiable.
"""

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["index_first_axis", "index_put_first_axis", "pad_input", "unpad_input"]


def index_first_axis(input: Tensor, indices: Tensor) -> Tensor:
    """input[indices] along the first axis (indices int64, (n,))."""
    return input.index_select(0, indices)


def index_put_first_axis(values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
    """Zeros (first_axis_dim, *values.shape[1:]) with values at rows `indices` (distinct)."""
    return values.new_zeros(first_axis_dim, *values.shape[1:]).index_copy(0, indices, values)


def unpad_input(hidden_states: Tensor, attention_mask: Tensor, unused_mask=None):
    """hidden_states (batch, seqlen, ...) and attention_mask (batch, seqlen), 1 for the tokens kept:
    (the kept tokens (total, ...), their indices in the flattened batch (int64), cu_seqlens (int32,
    batch + 1), the longest sequence's length (int), each sequence's count of attention_mask's
    tokens (int32)). unused_mask marks tokens kept beside the used ones (counted in cu_seqlens, not
    in the last)."""
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"attention_mask must be (batch, seqlen) = {tuple(hidden_states.shape[:2])}, got "
                         f"{tuple(attention_mask.shape)}")
    kept = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens = kept.sum(dim=-1, dtype=torch.int32)
    used_seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    tokens = index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices)
    return tokens, indices, cu_seqlens, max_seqlen, used_seqlens


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """The packed tokens (total, ...) back at `indices` of a zero (batch, seqlen, ...) batch."""
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.view(batch, seqlen, *hidden_states.shape[1:])
