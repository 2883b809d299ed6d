"""Preallocated key/value cache for one attention layer, written at explicit positions."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of every position seen so far, for up to `max_batch_size` sequences.

    Buffers are (max_batch_size, n_kv_heads, max_seq_len, head_dim), the layout attention reads
    (gpt-fast's): a prefix of positions is a strided view, never a copy. Only KV heads are stored,
    so grouped-query models (70B: 8 KV heads for 64 query heads) keep an 8x smaller cache, and
    attention reads it without expanding it to the query heads. A row of the buffer is a "slot";
    a batch row maps to a slot through `slots` (default: batch row i -> slot i), which lets a
    scheduler keep sequences in fixed slots while the running batch changes.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k_cache: Tensor
        self.v_cache: Tensor
        # Ordinary tensors even when allocated under inference mode (e.g. by a generation loop): an
        # inference tensor could not be written later outside inference mode (a plain no_grad forward).
        with torch.inference_mode(False):
            k = torch.zeros(shape, dtype=dtype, device=device)
            v = torch.zeros(shape, dtype=dtype, device=device)
        self.register_buffer("k_cache", k, persistent=False)
        self.register_buffer("v_cache", v, persistent=False)

    @property
    def max_batch_size(self) -> int:
        return self.k_cache.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def update(
        self,
        k: Tensor,
        v: Tensor,
        positions: Tensor | None,
        kv_len: int,
        start_pos: int | None,
        slots: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Write k, v (B, T, Hkv, D) at their positions; return keys/values (B, Hkv, kv_len, D).

        Args:
            k: new keys (B, T, Hkv, D).
            v: new values (B, T, Hkv, D).
            positions: (B, T) int64 cache positions; may be None when `start_pos` is set.
            kv_len: how many leading positions to return.
            start_pos: set when every row starts at the same position (a contiguous slice write).
            slots: (B,) int64 cache rows of the batch rows; None: batch row i is cache row i.

        Returns:
            Views of the cache when `slots` is None (no copy); with slots, a gather of those rows'
            first `kv_len` positions.
        """
        bsz, seqlen = k.shape[:2]
        k = k.to(self.k_cache.dtype)
        v = v.to(self.v_cache.dtype)
        if slots is None and start_pos is not None:
            self.k_cache[:bsz, :, start_pos : start_pos + seqlen] = k.transpose(1, 2)
            self.v_cache[:bsz, :, start_pos : start_pos + seqlen] = v.transpose(1, 2)
            return self.k_cache[:bsz, :, :kv_len], self.v_cache[:bsz, :, :kv_len]  # views, no copy
        if positions is None:
            positions = (start_pos or 0) + torch.arange(seqlen, device=k.device).expand(bsz, seqlen)
        rows = (torch.arange(bsz, device=k.device) if slots is None else slots)[:, None]  # (B, 1)
        # Advanced indices on dims 0 and 2 around a slice: the indexed view is (B, T, Hkv, D).
        self.k_cache[rows, :, positions] = k
        self.v_cache[rows, :, positions] = v
        if slots is None:
            return self.k_cache[:bsz, :, :kv_len], self.v_cache[:bsz, :, :kv_len]  # views, no copy
        return self.k_cache[:, :, :kv_len][slots], self.v_cache[:, :, :kv_len][slots]  # (B, Hkv, L, D)

    def reset(self, slots: Tensor | None = None) -> None:
        """Zero the whole cache or the given slots (not needed for correctness: positions are explicit)."""
        if slots is None:
            self.k_cache.zero_()
            self.v_cache.zero_()
        else:
            self.k_cache[slots] = 0
            self.v_cache[slots] = 0


def default_cache_dtype(weight_dtype: torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The KV-cache dtype `Transformer.setup_caches` picks: float32 on CPU (one-query attention over a
    bfloat16 cache is several times slower there than over float32, for twice the cache bytes), else
    the float weights' dtype (float32 when the weights are quantized: `weight_dtype` None)."""
    if torch.device(device).type == "cpu" or weight_dtype is None or not weight_dtype.is_floating_point:
        return torch.float32
    return weight_dtype
