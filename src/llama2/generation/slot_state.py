"""The step engine's per-slot sampling state: tokens seen (repetition penalty), counts of generated
tokens (presence / frequency penalties) and `logit_bias` rows, one row per KV-cache slot, each
tensor allocated on first use. `sampling.process_logits` reads the rows of a batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llama2.generation.sampling import SamplingParams


class SlotSamplingState:
    """(rows, V) penalty and bias tensors indexed by slot.

    Example:
        >>> state = SlotSamplingState(9, vocab_size, device)
        >>> state.reset(slot, prompt, params)          # when a sequence takes the slot
        >>> seen, counts, bias = state.gather(slots, batch_params)
        >>> state.record(slots, tokens)                # after sampling
    """

    def __init__(self, rows: int, vocab_size: int, device: torch.device) -> None:
        self.rows = rows
        self.vocab_size = vocab_size
        self.device = device
        self.seen: Tensor | None = None  # (rows, V) bool
        self.counts: Tensor | None = None  # (rows, V) int32
        self.bias: Tensor | None = None  # (rows, V) float32

    def _zeros(self, dtype: torch.dtype) -> Tensor:
        return torch.zeros(self.rows, self.vocab_size, dtype=dtype, device=self.device)  # (rows, V)

    def reset(self, slot: int, prompt: Sequence[int], p: SamplingParams) -> None:
        """Set slot's rows for a new sequence. A row is reset whenever its tensor exists: a batch
        that mixes settings reads every row of the tensor, so no stale value may stay."""
        if p.repetition_penalty != 1.0 or self.seen is not None:
            if self.seen is None:
                self.seen = self._zeros(torch.bool)
            self.seen[slot] = False
            self.seen[slot, torch.tensor(list(prompt), dtype=torch.long, device=self.device)] = True
        if p.presence_penalty or p.frequency_penalty or self.counts is not None:
            if self.counts is None:
                self.counts = self._zeros(torch.int32)
            self.counts[slot] = 0
        if p.logit_bias or self.bias is not None:
            if self.bias is None:
                self.bias = self._zeros(torch.float32)
            self.bias[slot] = 0.0
            for tok, value in (p.logit_bias or {}).items():
                self.bias[slot, int(tok)] = float(value)

    def gather(
        self, slots: Tensor, params: Sequence[SamplingParams]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(seen, counts, bias) rows (B, V) of `slots` (B,), each None when no row of the batch uses it."""
        uses_seen = any(p.repetition_penalty != 1.0 for p in params)
        uses_counts = any(p.presence_penalty or p.frequency_penalty for p in params)
        uses_bias = any(p.logit_bias for p in params)
        return (
            self.seen[slots] if uses_seen and self.seen is not None else None,  # (B, V)
            self.counts[slots] if uses_counts and self.counts is not None else None,  # (B, V)
            self.bias[slots] if uses_bias and self.bias is not None else None,  # (B, V)
        )

    def record(self, slots: Tensor, tokens: Tensor) -> None:
        """The tokens (B',) just generated in `slots` (B',) are now part of their sequences."""
        if self.seen is not None:
            self.seen[slots, tokens] = True
        if self.counts is not None:
            self.counts[slots, tokens] += 1
