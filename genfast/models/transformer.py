"""A small decoder-only transformer language model on genfast.attention, with a KV cache.

Bytes are the tokens (256 of them), so any text trains it without a tokenizer; data.python_text()
is text that ships with Python. The attention is causal aligned bottom-right, so the same call
serves training (the queries are all the keys) and decoding with a cache (the queries are the last
positions of the keys). Positions are learned embeddings, or (rotary=True) Llama's rotary embedding
of queries and keys by genfast.rotary, the cache holding the turned keys.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attention
from ..nn import ImplSwitch
from ..rotary import rotary
from .flows import _fit

Tensor = torch.Tensor
KVCache = List[Tuple[Tensor, Tensor]]  # per layer: keys and values (B, kv_heads, L, head_dim)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, impl: str):
        super().__init__()
        if dim % heads or heads % kv_heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim}) and kv_heads ({kv_heads}) divide heads")
        self.heads, self.kv_heads, self.head_dim, self.impl = heads, kv_heads, dim // heads, impl
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cache: Optional[Tuple[Tensor, Tensor]] = None, turn=None):
        """turn: (cos, sin, positions) of the rotary embedding, or None."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, length, self.heads, self.head_dim)
        k = k.view(batch, length, self.kv_heads, self.head_dim)
        if turn is not None:
            q, k = (rotary(t, *turn, impl=self.impl) for t in (q, k))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        o = attention(q, k, v, causal="bottom_right", enable_gqa=True, impl=self.impl)
        return self.out(o.transpose(1, 2).reshape(batch, length, -1)), (k, v)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, impl: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, kv_heads, impl)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, cache=None, turn=None):
        a, new_cache = self.attn(self.norm1(x), cache, turn)
        x = x + a
        return x + self.mlp(self.norm2(x)), new_cache


class TransformerLM(ImplSwitch, nn.Module):
    """GPT-style: token and learned position embeddings (or, with rotary, Llama's rotary embedding
    of queries and keys, base 10000), pre-norm blocks of causal self-attention (grouped-query when
    kv_heads < heads) and a GELU MLP, a tied output layer."""

    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, kv_heads: Optional[int] = None,
                 layers: int = 2, max_len: int = 256, impl: str = "auto", rotary: bool = False):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab, dim)
        self.position = None if rotary else nn.Embedding(max_len, dim)
        if rotary:
            head_dim = dim // heads
            angles = torch.arange(max_len, dtype=torch.float64)[:, None] * 10000.0 ** (
                -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
            self.register_buffer("cos", angles.cos().float(), persistent=False)
            self.register_buffer("sin", angles.sin().float(), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads or heads, impl) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.position is not None:
            nn.init.normal_(self.position.weight, std=0.02)
        self.impl = impl

    def forward(self, tokens: Tensor, cache: Optional[KVCache] = None) -> Tuple[Tensor, KVCache]:
        """(logits (B, L, vocab), the cache extended by these L positions)."""
        start = 0 if cache is None else cache[0][0].shape[2]
        if start + tokens.shape[1] > self.max_len:
            raise ValueError(f"positions up to {start + tokens.shape[1]} exceed max_len = {self.max_len}")
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)
        if self.position is not None:
            x, turn = x + self.position(positions), None
        else:
            turn = (self.cos.to(x.dtype), self.sin.to(x.dtype), positions)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, None if cache is None else cache[i], turn)
            new_cache.append(layer_cache)
        return self.norm(x) @ self.embed.weight.t(), new_cache

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats) over (B, L) tokens."""
        logits, _ = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def fit(self, windows: Tensor, steps: int = 100, batch_size: int = 16, lr: float = 3e-3, seed: int = 0):
        """Adam on the loss of random windows (N, L) of tokens; returns each step's loss."""
        return _fit(self, lambda batch, _: self.loss(batch), windows, steps, batch_size, lr, seed)

    @torch.no_grad()
    def generate(self, prompt: Tensor, steps: int, use_cache: bool = True) -> Tensor:
        """Greedy continuation (B, steps) of prompt (B, P): with the KV cache, each step feeds one
        token; without it, each step recomputes the whole sequence (the reference)."""
        tokens, out = prompt, []
        logits, cache = self(prompt)
        for _ in range(steps):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(next_token)
            tokens = torch.cat([tokens, next_token], dim=1)
            logits, cache = self(next_token, cache) if use_cache else self(tokens)
        return torch.cat(out, dim=1)


def text_windows(text: bytes, length: int) -> Tensor:
    """Non-overlapping windows (N, length) of the text's bytes, as int64 tokens."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    count = data.numel() // length
    return data[:count * length].view(count, length)


__all__ = ["TransformerLM", "text_windows"]
