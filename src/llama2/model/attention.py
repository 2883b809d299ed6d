"""Grouped-query self-attention over a KV cache with explicit positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama2.config import ModelArgs
from llama2.model.kv_cache import KVCache
from llama2.model.layers import apply_rotary

# `scaled_dot_product_attention(enable_gqa=True)` (torch >= 2.5) reads grouped KV heads in place.
SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * n_rep, L, D); query head h reads KV head h // n_rep (a copy)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Attention(nn.Module):
    """Multi-head (or grouped-query when n_kv_heads < n_heads) causal self-attention.

    Grouped KV heads are never expanded to the query heads: for one new token (decode) the n_rep
    query heads sharing a KV head become n_rep query rows of that head, q (B, Hkv, n_rep, D)
    against k (B, Hkv, L, D); for longer inputs SDPA's `enable_gqa` does the same (torch < 2.5
    falls back to `repeat_kv`).
    """

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
        freqs: Tensor,
        positions: Tensor | None,
        mask: Tensor | None,
        kv_len: int,
        start_pos: int | None,
        slots: Tensor | None,
        use_cache: bool = True,
    ) -> Tensor:
        """Attend over the cache (or, without one or with `use_cache` False, causally over x).

        Args:
            x: (B, T, dim).
            freqs: rotary (cos, sin), (B|1, T, 1, D/2, 2) float32.
            positions: (B, T) int64, or None when every row starts at `start_pos`.
            mask: additive (B, 1, T, kv_len) in x's dtype (0 where visible, -inf elsewhere), or
                None: every query sees all `kv_len` keys (decode) or, without a cache, is causal.
            kv_len: cache positions attended to.
            start_pos: the common first position, or None (per-row positions).
            slots: (B,) cache rows, or None.
            use_cache: False ignores the cache (a training forward: nothing read, nothing written).
        """
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        q = apply_rotary(q, freqs)
        k = apply_rotary(k, freqs)
        cache = self.cache if use_cache else None
        if cache is not None:
            keys, values = cache.update(k, v, positions, kv_len, start_pos, slots)  # (B, Hkv, L, D)
            if keys.dtype != q.dtype:  # attend in the wider dtype (a float32 cache: float32 SDPA)
                wide = torch.promote_types(q.dtype, keys.dtype)
                q, keys, values = q.to(wide), keys.to(wide), values.to(wide)
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        causal = mask is None and seqlen > 1  # no mask for T > 1: the keys are exactly the new tokens
        if seqlen == 1:
            # Fold the query heads of each KV head into the query-length dim (no copy of anything).
            # Plain matmuls, not SDPA: torch's CPU flash kernel costs milliseconds per call for one
            # query row (more than all of a small model's matmuls), the math is microseconds.
            qf = q.view(bsz, self.n_kv_heads, self.n_rep, self.head_dim)  # (B, Hkv, n_rep, D)
            scores = (qf @ keys.transpose(-1, -2)) * self.head_dim**-0.5  # (B, Hkv, n_rep, L)
            if mask is not None:
                scores = scores + mask  # (B, 1, 1, L) broadcast over heads
            probs = scores.float().softmax(dim=-1).to(values.dtype)  # (B, Hkv, n_rep, L)
            out = probs @ values  # (B, Hkv, n_rep, D)
            result: Tensor = self.wo(out.reshape(bsz, 1, -1).to(x.dtype))  # (B, 1, dim)
            return result
        qt = q.transpose(1, 2)  # (B, H, T, D)
        if SDPA_GQA:
            out = F.scaled_dot_product_attention(
                qt, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=self.n_rep > 1
            )  # (B, H, T, D)
        else:  # pragma: no cover - torch < 2.5
            out = F.scaled_dot_product_attention(
                qt,
                repeat_kv(keys, self.n_rep),
                repeat_kv(values, self.n_rep),
                attn_mask=mask,
                is_causal=causal,
            )  # (B, H, T, D)
        result = self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1).to(x.dtype))  # (B, T, dim)
        return result
