"""Scheduling policy of the engine as plain code over counts (no torch): who may queue, who gets a
cache slot, and which prompt chunks run in one step.

- Queue limit: free slots absorb a burst at the next step; beyond them, `max_queue` sequences may
  wait. A request is taken whole or refused (HTTP 429), never split.
- Admission: first come, first served, one sequence per free slot.
- Prefill budget: prompts are prefilled in arrival order, in chunks at fixed offsets (0, C, 2C, ...)
  of at most `chunk` tokens, until `budget` prompt tokens ran this step; the chunk that crosses the
  budget still runs, so at least one chunk always runs and a long prompt never stalls decoding for
  more than a chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillChunk:
    """One prefill forward: prompt `seq` (an index into the list given to `plan_prefill`) from
    position `start` to `end` (exclusive)."""

    seq: int
    start: int
    end: int


def queue_has_room(queued: int, new: int, max_queue: int, free_slots: int) -> bool:
    """True when `new` more sequences may be accepted.

    Args:
        queued: sequences already waiting for a slot (not yet admitted).
        new: sequences of the incoming request.
        max_queue: sequences allowed to wait beyond the free slots.
        free_slots: cache slots not held by any sequence.
    """
    return queued + new <= max_queue + free_slots


def admit_count(waiting: int, free_slots: int) -> int:
    """How many waiting sequences (the oldest first) get a slot now."""
    return max(0, min(waiting, free_slots))


def plan_prefill(progress: Sequence[tuple[int, int]], chunk: int, budget: int) -> list[PrefillChunk]:
    """The prompt chunks to run in one engine step.

    Args:
        progress: per prefilling sequence in arrival order, (tokens already prefilled, prompt length).
        chunk: most prompt tokens per forward (with one `chunk` for every step, chunks start at
            multiples of it: a prompt's prefill never depends on the rest of the batch).
        budget: prompt tokens per step over all sequences (the chunk that crosses it still runs).

    Returns:
        The chunks in the order to run them (a sequence's chunks are consecutive).
    """
    plan: list[PrefillChunk] = []
    left = budget
    for i, (done, length) in enumerate(progress):
        pos = done
        while left > 0 and pos < length:
            end = min(pos + chunk, length)
            plan.append(PrefillChunk(i, pos, end))
            left -= end - pos
            pos = end
        if left <= 0:
            break
    return plan
