"""Rotary position embedding (RoPE), in plain PyTorch: the rotation flash_attn_with_kvcache applies to
queries and new keys before attention.

x (..., L, H, D) at positions p (..., L), with tables cos and sin (positions, R / 2) for a rotary
dimension R <= D (R even): the first R features turn in R / 2 planes, plane m by the angle whose
cosine and sine are cos[p, m] and sin[p, m]; features R .. D pass unchanged.

    interleaved (GPT-J, FlashAttention's default): plane m is features (2m, 2m + 1);
    not interleaved (GPT-NeoX, Llama in transformers): plane m is features (m, m + R / 2);
    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos).

inverse negates sin: the transpose of the map, which is the backward that genfast.rotary's kernels
run, and, for tables of a rotation (cos^2 + sin^2 = 1), the turn back. Tables that also scale
(XPos's) are linear maps all the same, and their backward is the same transpose.

Computed in float32 (float64 for float64 inputs) and rounded once to x's dtype, as FlashAttention's
kernel does.
"""

import torch

Tensor = torch.Tensor


def rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool = True,
           inverse: bool = False) -> Tensor:
    """x rotated at `positions` (integer, x's shape without the last two dims)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    half = cos.shape[-1]
    c = cos[positions.long()].to(compute).unsqueeze(-2)  # (..., L, 1, R / 2)
    s = sin[positions.long()].to(compute).unsqueeze(-2)
    if inverse:
        s = -s
    turned, rest = x[..., :2 * half].to(compute), x[..., 2 * half:]
    if interleaved:
        x1, x2 = turned[..., 0::2], turned[..., 1::2]
        turned = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = turned[..., :half], turned[..., half:]
        turned = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((turned.to(x.dtype), rest), dim=-1)
