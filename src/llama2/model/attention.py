"""Grouped-query self-attention over a KV cache with explicit positions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from llama2.config import ModelArgs
from llama2.model.kv_cache import KVCache
from llama2.model.layers import apply_rotary


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, L, Hkv, D) -> (B, L, Hkv * n_rep, D); query head h reads KV head h // n_rep."""
    if n_rep == 1:
        return x
    b, s, h, d = x.shape
    return x[:, :, :, None, :].expand(b, s, h, n_rep, d).reshape(b, s, h * n_rep, d)


class Attention(nn.Module):
    """Multi-head (or grouped-query when n_kv_heads < n_heads) causal self-attention."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        positions: Tensor,
        mask: Tensor | None,
        kv_len: int,
        start_pos: int | None,
        slots: Tensor | None,
    ) -> Tensor:
        """x: (B, T, dim); cos/sin: (B, T, D/2); positions: (B, T); mask: (B, 1, T, kv_len) bool or None."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(k, v, positions, kv_len, start_pos, slots)  # (B, L, Hkv, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        keys = repeat_kv(k, self.n_rep).transpose(1, 2)  # (B, H, L, D)
        values = repeat_kv(v, self.n_rep).transpose(1, 2)  # (B, H, L, D)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (B, H, T, D)
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None and self.cache is None and seqlen > 1,
        )  # (B, H, T, D)
        result: Tensor = self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))  # (B, T, dim)
        return result
