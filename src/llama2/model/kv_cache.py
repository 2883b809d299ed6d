"""Preallocated key/value cache for one attention layer, written at explicit positions."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of every position seen so far, for up to `max_batch_size` sequences.

    Buffers are (max_batch_size, max_seq_len, n_kv_heads, head_dim): only KV heads are stored, so
    grouped-query models (70B: 8 KV heads for 64 query heads) keep an 8x smaller cache. A row of the
    buffer is a "slot"; a batch row maps to a slot through `slots` (default: batch row i -> slot i),
    which lets a scheduler keep sequences in fixed slots while the running batch changes.
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
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.k_cache: Tensor
        self.v_cache: Tensor
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch_size(self) -> int:
        return self.k_cache.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[1]

    def update(
        self,
        k: Tensor,
        v: Tensor,
        positions: Tensor,
        kv_len: int,
        start_pos: int | None,
        slots: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Write k, v (B, T, Hkv, D) at `positions` (B, T) and return keys/values (B, kv_len, Hkv, D).

        `start_pos` is set when every row starts at the same position (contiguous slice write).
        """
        bsz, seqlen = k.shape[:2]
        k = k.to(self.k_cache.dtype)
        v = v.to(self.v_cache.dtype)
        if slots is None:
            if start_pos is not None:
                self.k_cache[:bsz, start_pos : start_pos + seqlen] = k
                self.v_cache[:bsz, start_pos : start_pos + seqlen] = v
            else:
                rows = torch.arange(bsz, device=k.device)[:, None]  # (B, 1)
                self.k_cache[rows, positions] = k
                self.v_cache[rows, positions] = v
            return self.k_cache[:bsz, :kv_len], self.v_cache[:bsz, :kv_len]  # views, no copy
        rows = slots[:, None]  # (B, 1)
        self.k_cache[rows, positions] = k
        self.v_cache[rows, positions] = v
        return self.k_cache[slots, :kv_len], self.v_cache[slots, :kv_len]

    def reset(self, slots: Tensor | None = None) -> None:
        """Zero the whole cache or the given slots (not needed for correctness: positions are explicit)."""
        if slots is None:
            self.k_cache.zero_()
            self.v_cache.zero_()
        else:
            self.k_cache[slots] = 0
            self.v_cache[slots] = 0
