"""The scheduling policy (queue limit, admission, prefill budget) as plain code: hand-computed cases,
and a check that it imports no torch."""

from __future__ import annotations

import subprocess
import sys

from llama2.scheduling import PrefillChunk, admit_count, plan_prefill, queue_has_room


def test_policy_imports_without_torch() -> None:
    code = "import sys, llama2.scheduling; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_queue_limit_counts_free_slots_as_room() -> None:
    # 2 may wait beyond the 1 free slot: 3 new fit into an empty queue, a 4th does not.
    assert queue_has_room(queued=0, new=3, max_queue=2, free_slots=1)
    assert not queue_has_room(queued=0, new=4, max_queue=2, free_slots=1)
    assert not queue_has_room(queued=1, new=3, max_queue=2, free_slots=1)
    assert queue_has_room(queued=5, new=0, max_queue=2, free_slots=3)
    assert not queue_has_room(queued=0, new=1, max_queue=0, free_slots=0)


def test_admission_is_one_per_free_slot() -> None:
    assert admit_count(waiting=5, free_slots=2) == 2
    assert admit_count(waiting=1, free_slots=4) == 1
    assert admit_count(waiting=0, free_slots=3) == 0
    assert admit_count(waiting=3, free_slots=0) == 0


def test_prefill_budget_splits_prompts_into_chunks() -> None:
    # 40 + 10 prompt tokens, chunks of 16, 32 tokens per step.
    first = plan_prefill([(0, 40), (0, 10)], chunk=16, budget=32)
    assert first == [PrefillChunk(0, 0, 16), PrefillChunk(0, 16, 32)]
    second = plan_prefill([(32, 40), (0, 10)], chunk=16, budget=32)
    assert second == [PrefillChunk(0, 32, 40), PrefillChunk(1, 0, 10)]
    assert plan_prefill([], chunk=16, budget=32) == []


def test_the_chunk_crossing_the_budget_still_runs() -> None:
    assert plan_prefill([(0, 100), (0, 3)], chunk=16, budget=5) == [PrefillChunk(0, 0, 16)]
    assert plan_prefill([(0, 20), (0, 3)], chunk=16, budget=17) == [
        PrefillChunk(0, 0, 16),
        PrefillChunk(0, 16, 20),
    ]


def test_chunks_sit_at_fixed_offsets_whatever_the_other_prompts() -> None:
    """Simulated steps: every chunk of prompt A starts at a multiple of the chunk size and the
    chunks tile A exactly, whether A is alone or behind other prompts."""
    for others in ([], [7], [33, 5]):
        lengths = [*others, 45]
        done = [0] * len(lengths)
        starts: list[tuple[int, int]] = []
        for _ in range(50):
            active = [i for i, n in enumerate(lengths) if done[i] < n]
            if not active:
                break
            for c in plan_prefill([(done[i], lengths[i]) for i in active], chunk=8, budget=12):
                i = active[c.seq]
                assert c.start == done[i]
                done[i] = c.end
                if i == len(lengths) - 1:
                    starts.append((c.start, c.end))
        assert done == lengths
        assert starts == [(s, min(s + 8, 45)) for s in range(0, 45, 8)], others
