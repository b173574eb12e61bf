"""xformers.ops's attention on genfast: memory_efficient_attention and its family (fmha), the
biases (fmha.attn_bias) and unbind."""

import torch

from . import fmha
from .fmha import (AttentionBias, AttentionOp, AttentionOpBase, LowerTriangularMask, MemoryEfficientAttentionCkOp,
                   MemoryEfficientAttentionCutlassFwdFlashBwOp, MemoryEfficientAttentionCutlassOp,
                   MemoryEfficientAttentionFlashAttentionOp, memory_efficient_attention,
                   memory_efficient_attention_backward, memory_efficient_attention_forward,
                   memory_efficient_attention_forward_requires_grad)

__all__ = ["AttentionBias", "AttentionOp", "AttentionOpBase", "LowerTriangularMask", "MemoryEfficientAttentionCkOp",
           "MemoryEfficientAttentionCutlassFwdFlashBwOp", "MemoryEfficientAttentionCutlassOp",
           "MemoryEfficientAttentionFlashAttentionOp", "fmha", "memory_efficient_attention",
           "memory_efficient_attention_backward", "memory_efficient_attention_forward",
           "memory_efficient_attention_forward_requires_grad", "unbind"]


def unbind(x: torch.Tensor, dim: int):
    """x's slices along dim (xformers' unbind, which stacks their gradients without a copy where it can)."""
    return x.unbind(dim)
