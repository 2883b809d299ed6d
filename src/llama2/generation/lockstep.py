"""Meta's lockstep schedule for `StepEngine` (`EngineConfig(lockstep=True)`), the one `Generator`
drives: prompts are right-padded into one (B, total_len) buffer, the first forward covers the
shortest prompt for every row at once, and each later step feeds one column; a row still inside its
prompt keeps its prompt token instead of the sample. No padding ever enters the model, and every row
stays in the batch until the batch ends (as in Meta's `generate`), so with torch's global generator
an unseeded batch consumes random numbers exactly as Meta's reference does.

This module holds the batch's state, its forward and the engine's lockstep step (`lockstep_step`,
called by `StepEngine.step`); sampling, logprobs and stop rules are the engine's
(`StepEngine.sample_and_emit`), shared with the slot schedule. It reaches the engine only through
`LockstepHost`, the few members it needs, so it never imports the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from llama2.errors import GenerationError
from llama2.generation.logprobs import gather_logprobs

if TYPE_CHECKING:
    from llama2.generation.decode import DecodeStep
    from llama2.generation.engine_types import EngineConfig, EngineSequence, Outbox
    from llama2.generation.sequence import TokenEvent
    from llama2.model import Transformer


@dataclass
class LockstepBatch:
    """One lockstep batch: the token buffer and where the schedule stands.

    Attributes:
        seqs: the rows, in order (row i uses cache row i).
        buf: (B, total_len) int64 prompts, then the chosen tokens column by column.
        prompt_mask: (B, total_len) bool, True inside a row's prompt.
        lens: prompt length per row.
        total_len: longest prompt + generation budget over the rows.
        token_lp: (B, total_len) float32 logprob of every token given the ones before it (Meta's
            echo), or None when no row asked for its prompt's logprobs.
        cur: the column the next step fills.
        prev: the first column the next step feeds.
    """

    seqs: list[EngineSequence]
    buf: Tensor
    prompt_mask: Tensor
    lens: list[int]
    total_len: int
    token_lp: Tensor | None
    cur: int
    prev: int = 0

    @classmethod
    def start(cls, seqs: list[EngineSequence], device: torch.device) -> LockstepBatch:
        lens = [len(s.spec.prompt) for s in seqs]
        total_len = max(n + s.spec.max_tokens for n, s in zip(lens, seqs, strict=True))
        buf = torch.zeros(len(seqs), total_len, dtype=torch.long, device=device)  # (B, total_len)
        for i, s in enumerate(seqs):
            buf[i, : lens[i]] = torch.tensor(s.spec.prompt, dtype=torch.long, device=device)
        prompt_mask = (
            torch.arange(total_len, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        )  # (B, total_len)
        want_lp = any(s.want_prompt_lp for s in seqs)
        token_lp = torch.zeros(len(seqs), total_len, device=device) if want_lp else None  # (B, total_len)
        return cls(list(seqs), buf, prompt_mask, lens, total_len, token_lp, cur=min(lens))

    @property
    def rows(self) -> int:
        return len(self.seqs)

    @property
    def min_len(self) -> int:
        return min(self.lens)

    @property
    def max_len(self) -> int:
        return max(self.lens)

    def ended(self) -> bool:
        """Every column filled, or every row done (and, with echo logprobs, every prompt read)."""
        if self.cur >= self.total_len:
            return True
        done = all(s.state.done for s in self.seqs)
        return done and (self.token_lp is None or self.cur > self.max_len - 1)

    def generating(self) -> list[bool]:
        """Rows that sample at column `cur`: past their prompt, not done and not cancelled."""
        pairs = zip(self.lens, self.seqs, strict=True)
        return [self.cur >= n and not (s.state.done or s.finished) for n, s in pairs]

    def close(self) -> None:
        """Hand each echoing row its prompt logprobs (the results are already out: same objects)."""
        if self.token_lp is None:
            return
        lp_rows = self.token_lp.tolist()
        for i, s in enumerate(self.seqs):
            if s.want_prompt_lp:
                s.state.result.prompt_logprobs = lp_rows[i][: self.lens[i]]


class LockstepHost(Protocol):
    """What the lockstep schedule needs from its engine (`llama2.generation.engine.StepEngine`)."""

    lockstep_batch: LockstepBatch | None  # the running batch, None between batches

    @property
    def config(self) -> EngineConfig: ...
    @property
    def model(self) -> Transformer: ...
    @property
    def decode_step(self) -> DecodeStep | None: ...
    @property
    def device(self) -> torch.device: ...

    def waiting_count(self) -> int:
        """How many sequences wait for a slot."""
        ...

    def take_waiting(self) -> list[EngineSequence]:
        """Every waiting sequence, in order; the queue is left empty."""
        ...

    def check_cache(self, rows: int, length: int) -> None:
        """GenerationError unless the model's KV cache holds `rows` rows of `length` positions."""
        ...

    def take_slot(self, seq: EngineSequence) -> None:
        """Give `seq` the next free slot (0 first) and fresh sampling state; it is now running."""
        ...

    def sample_and_emit(
        self,
        seqs: list[EngineSequence],
        logits: Tensor,
        out: Outbox,
        *,
        slots: list[int] | None = None,
        active: list[bool] | None = None,
        forced: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Sample a token per row of logits (B, V), apply stop rules, emit; (B,) the chosen tokens."""
        ...

    def finish_sequence(self, seq: EngineSequence, event: TokenEvent, out: Outbox) -> None:
        """Emit `seq`'s last event and result and release its slot."""
        ...

    def release_sequence(self, seq: EngineSequence, reason: str) -> None:
        """Free `seq`'s slot (a no-op once released) and count it as finished with `reason`."""
        ...

    def free_every_slot(self) -> None:
        """Make every slot free again (between lockstep batches)."""
        ...


def lockstep_forward(
    model: Transformer, decode_step: DecodeStep | None, tokens: Tensor, start_pos: int, last_only: bool
) -> Tensor:
    """Logits (B, T, V) of `tokens` (B, T) at positions start_pos.. in cache rows 0..B-1, or
    (B, 1, V) for the last position only (skips the head elsewhere)."""
    if decode_step is not None and tokens.shape[1] == 1 and last_only:
        positions = torch.full((tokens.shape[0],), start_pos, dtype=torch.long, device=tokens.device)  # (B,)
        return decode_step(tokens, positions)[:, None]  # (B, 1, V)
    if last_only and tokens.shape[1] > 1 and hasattr(model, "hidden_states"):
        h = model.hidden_states(tokens, start_pos)[:, -1:]  # (B, 1, dim)
        head: Tensor = model.output(h)  # (B, 1, V)
        return head.float()
    logits: Tensor = model(tokens, start_pos)  # (B, T, V)
    return logits.float()


def lockstep_step(engine: LockstepHost, out: Outbox) -> None:
    """Start a batch of every waiting sequence, or advance the running one by one column."""
    lock = engine.lockstep_batch
    if lock is None:
        if not engine.waiting_count():
            return
        lock = _start(engine, out)
    if not lock.ended():
        cur, prev = lock.cur, lock.prev
        logits = lockstep_forward(
            engine.model, engine.decode_step, lock.buf[:, prev:cur], prev, last_only=lock.token_lp is None
        )  # (B, T, V)
        forced = (lock.prompt_mask[:, cur], lock.buf[:, cur]) if cur < lock.max_len else None
        rows = list(range(lock.rows))
        lock.buf[:, cur] = engine.sample_and_emit(
            lock.seqs, logits[:, -1], out, slots=rows, active=lock.generating(), forced=forced
        )
        if lock.token_lp is not None:  # Meta's echo: logprob of every token in this chunk
            chunk = lock.buf[:, prev + 1 : cur + 1]  # (B, T): the tokens these logits predict
            lock.token_lp[:, prev + 1 : cur + 1] = gather_logprobs(logits, chunk)
        lock.prev, lock.cur = cur, cur + 1
    if lock.ended():
        lock.close()
        end_lockstep(engine)


def _start(engine: LockstepHost, out: Outbox) -> LockstepBatch:
    """Admit every waiting sequence as one batch into rows 0..B-1 (GenerationError if they do not
    fit `max_slots` or the caller's cache); rows with nothing to generate finish at once."""
    waiting = engine.waiting_count()
    if waiting > engine.config.max_slots:
        raise GenerationError(
            f"{waiting} sequences wait for one lockstep batch of at most {engine.config.max_slots}"
        )
    seqs = engine.take_waiting()
    lock = LockstepBatch.start(seqs, engine.device)
    engine.check_cache(lock.rows, lock.total_len)
    for seq in seqs:
        engine.take_slot(seq)  # slots 0, 1, ...: row i is cache row i
    engine.lockstep_batch = lock
    if lock.token_lp is not None and lock.min_len == lock.total_len:
        # Nothing to generate (every prompt fills the window): one forward for prompt logprobs.
        logits = lockstep_forward(engine.model, None, lock.buf, 0, last_only=False)  # (B, T, V)
        lock.token_lp[:, 1:] = gather_logprobs(logits[:, :-1], lock.buf[:, 1:])  # (B, T-1)
    for seq in seqs:
        if seq.spec.max_tokens == 0:
            engine.finish_sequence(seq, seq.state.finish_without_step(), out)
    return lock


def end_lockstep(engine: LockstepHost) -> None:
    """Release the batch's rows (a no-op for the finished ones) and make every slot free again."""
    if engine.lockstep_batch is None:
        return
    for seq in engine.lockstep_batch.seqs:
        engine.release_sequence(seq, "cancelled")  # no-op for the finished ones
    engine.lockstep_batch = None
    engine.free_every_slot()
