"""The slot-based step engine: sequences are admitted into KV-cache slots, prompts are prefilled in
chunks with per-row start positions, running sequences decode in one batched forward, and every
sampled token goes through one sampling chain (`sampling.process_logits` + `sample_tokens`), one
logprob computation (`logprobs.token_logprobs`) and one stop / holdback rule (`SequenceState`).

`StepEngine.step` is synchronous and thread-agnostic: the server's background thread
(`llama2.serve.async_engine.Engine`) calls it in a loop; any other caller (RL rollouts, scripts)
can call it directly. Scheduling decisions (admission, prefill budget) are the torch-free functions
of `llama2.scheduling`.

Each step:
  1. gives free KV-cache slots to waiting sequences (first come, first served);
  2. runs one decode step for every sequence that has finished its prompt: one forward of (B, 1)
     tokens with per-row positions (`start_pos` tensor) and cache rows (`slots` tensor);
  3. prefills waiting prompts in chunks of `prefill_chunk` tokens, at most `prefill_budget` prompt
     tokens per step, so one long prompt never stalls the running streams for more than a chunk.

Memory is a fixed budget: `max_slots` cache rows of `max_seq_len` positions, allocated once; a
sequence owns one row from admission until it ends (finished, cancelled or failed).

Batch invariance (a request gives the same tokens alone or under load):
  - a prompt is always prefilled alone (batch of 1) in chunks at fixed offsets (0, C, 2C, ...), so
    its first token never depends on the rest of the batch;
  - decode batches are padded to at least `min_decode_rows` rows (padding rows write into a spare
    scratch cache row), because CPU BLAS uses different kernels for 1, 2-3 and >= 4 rows: with >= 4
    rows a row's result does not depend on how many other rows there are. What is left is attention
    over a longer masked key range (~1e-7 differences), far below the gaps decoding decides on;
  - each sequence samples from its own generator (`sampling.seeded_generator`, the rule the
    `Generator` follows too; an unseeded sequence gets a random seed).

`EngineConfig(lockstep=True, caller_cache=True, global_rng=True)` is Meta's `generate` instead
(`lockstep.LockstepBatch`), which `Generator` drives: same sampling, logprob and stop code, Meta's
batch schedule and random-number order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llama2.errors import GenerationError
from llama2.generation.decode import DecodeStep
from llama2.generation.engine_types import (
    EngineConfig,
    EngineItem,
    EngineMetrics,
    EngineSequence,
    Outbox,
    PromptLogprobs,
    SequenceDone,
    SequenceFailed,
    SequenceSpec,
)
from llama2.generation.lockstep import LockstepBatch, end_lockstep, lockstep_step
from llama2.generation.logprobs import token_logprobs
from llama2.generation.sampling import NEG_INF, finite_logits, process_logits, sample_tokens
from llama2.generation.sequence import Detokenizer, GenerationResult, TokenEvent
from llama2.generation.slot_state import SlotSamplingState
from llama2.scheduling import admit_count, plan_prefill
from llama2.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llama2.model import Transformer

__all__ = [
    "EngineConfig",
    "EngineItem",
    "EngineMetrics",
    "EngineSequence",
    "Outbox",
    "PromptLogprobs",
    "SequenceDone",
    "SequenceFailed",
    "SequenceSpec",
    "StepEngine",
]

log = logging.getLogger("llama2.engine")


class StepEngine:
    """Continuous batching over a `Transformer` with a preallocated, slot-indexed KV cache.

    Example:
        >>> engine = StepEngine(model, tokenizer, EngineConfig(max_slots=8))
        >>> engine.add([engine.new_sequence(None, 0, SequenceSpec(prompt, 32))])
        >>> while engine.has_work():
        ...     for owner, item in engine.step():   # TokenEvent ... then SequenceDone
        ...         ...
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        metrics: EngineMetrics | None = None,
        *,
        decode_step: DecodeStep | None = None,
    ) -> None:
        """Allocate the KV cache (`max_slots` + 1 scratch row, unless `config.caller_cache`) and the
        per-slot sampling state. `decode_step`: a (compiled) decode step to share with other callers
        (default: one built from `config.compile`, or eager decoding).

        Raises:
            GenerationError: the tokenizer's vocabulary is larger than the model's, or the caller's
                cache is missing or too small.
        """
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.metrics = metrics
        args = model.args
        pieces = getattr(tokenizer, "vocab_size", 0)  # a caller's minimal tokenizer may not say
        if pieces > args.vocab_size:
            raise GenerationError(
                f"tokenizer has {pieces} pieces but the model's vocabulary is "
                f"{args.vocab_size}; expected the tokenizer that belongs to the model"
            )
        self.vocab_size = args.vocab_size
        self.max_seq_len = self.config.max_seq_len or args.max_seq_len
        self.device = model.tok_embeddings.weight.device
        n = self.config.max_slots
        self.scratch_slot = n  # padding rows of decode batches write here
        if self.config.caller_cache:
            if not self.config.lockstep:  # lockstep checks its rows when a batch starts
                self.check_cache(n + 1, self.max_seq_len)
        else:
            model.setup_caches(n + 1, self.max_seq_len, dtype=self.config.cache_dtype)
        # The compiled decode step (the Generator's too), when asked for: checks the mode.
        if decode_step is None and self.config.compile:
            decode_step = DecodeStep(model, compile=self.config.compile)
        self.decode_step = decode_step
        self.lockstep_batch: LockstepBatch | None = None  # the running lockstep batch (`LockstepHost`)
        self._free_slots: list[int] = list(range(n - 1, -1, -1))  # pop() hands out slot 0 first
        self._state = SlotSamplingState(n + 1, self.vocab_size, self.device)  # penalties, logit_bias
        self._waiting: deque[EngineSequence] = deque()
        self._running: list[EngineSequence] = []  # hold a slot: prefilling or decoding

    # ------------------------------------------------------------------ public
    @property
    def context_window(self) -> int:
        return self.max_seq_len

    def check_spec(self, spec: SequenceSpec) -> None:
        """Raise GenerationError unless `spec` fits the vocabulary and the context window."""
        n = len(spec.prompt)
        if n == 0:
            raise GenerationError("the prompt is empty; expected at least one token")
        if spec.max_tokens < 0:
            raise GenerationError(f"max_tokens must be >= 0, got {spec.max_tokens}")
        if n + spec.max_tokens > self.max_seq_len:
            raise GenerationError(
                f"the prompt ({n} tokens) plus max_tokens ({spec.max_tokens}) exceeds the context "
                f"window of {self.max_seq_len} tokens"
            )
        bad = next((t for t in spec.prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise GenerationError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        for tok in spec.params.logit_bias or {}:
            if not 0 <= int(tok) < self.vocab_size:
                raise GenerationError(
                    f"logit_bias token id {tok} is outside the vocabulary [0, {self.vocab_size})"
                )

    def new_sequence(
        self, owner: object, index: int, spec: SequenceSpec, detok: Detokenizer | None = None
    ) -> EngineSequence:
        """A checked sequence for `add` (GenerationError if the spec does not fit); `detok`: its
        streaming detokenizer (default: the tokenizer's)."""
        self.check_spec(spec)
        return EngineSequence(
            owner, index, spec, self.tokenizer, self.device, detok=detok, global_rng=self.config.global_rng
        )

    def add(self, seqs: list[EngineSequence]) -> None:
        """Queue sequences for a slot (admitted at the next step, in order)."""
        self._waiting.extend(seqs)

    def drop(self, owners: set[int]) -> int:
        """Cancel every unfinished sequence whose `id(owner)` is in `owners`; returns how many of
        them were still waiting for a slot."""
        kept: deque[EngineSequence] = deque()
        dropped = 0
        for seq in self._waiting:
            if id(seq.owner) in owners:
                seq.finished = True
                dropped += 1
                self._count_finished("cancelled")
            else:
                kept.append(seq)
        self._waiting = kept
        for seq in list(self._running):
            if id(seq.owner) in owners:
                self.release_sequence(seq, "cancelled")
        return dropped

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self.lockstep_batch is not None)

    def free_slots(self) -> int:
        return len(self._free_slots)

    def step(self) -> Outbox:
        """Admit, decode, prefill once; returns what the step produced, in order."""
        out: Outbox = []
        if self.config.lockstep:
            lockstep_step(self, out)
            return out
        self._admit(out)
        decoding = [s for s in self._running if s.prefilled and not s.finished]
        if decoding:
            self._decode(decoding, out)
        prefilling = [s for s in self._running if not s.prefilled and not s.finished]  # first come first
        plan = plan_prefill(
            [(s.pos, len(s.spec.prompt)) for s in prefilling],
            self.config.prefill_chunk,
            self.config.prefill_budget,
        )
        for chunk in plan:
            seq = prefilling[chunk.seq]
            if seq.finished:
                continue
            try:
                self._prefill_chunk(seq, chunk.start, chunk.end, out)
            except Exception as e:
                log.exception("prefill failed for one sequence")
                self._fail(seq, f"internal error while reading the prompt: {type(e).__name__}: {e}", out)
        self._running = [s for s in self._running if not s.finished]
        return out

    def run(self, specs: Sequence[SequenceSpec]) -> list[GenerationResult]:
        """Generate every spec to completion, synchronously (scripts, RL rollouts); other work
        already queued runs alongside and its items are dropped.

        Raises:
            GenerationError: a spec does not fit, or a sequence failed (the others are cancelled).
        """
        owner = object()
        self.add([self.new_sequence(owner, i, spec) for i, spec in enumerate(specs)])
        results: dict[int, GenerationResult] = {}
        with torch.no_grad():
            while len(results) < len(specs) and self.has_work():
                for who, item in self.step():
                    if who is not owner:
                        continue
                    if isinstance(item, SequenceDone):
                        results[item.index] = item.result
                    elif isinstance(item, SequenceFailed):
                        self.drop({id(owner)})
                        raise GenerationError(f"sequence {item.index} failed: {item.message}")
        return [results[i] for i in range(len(specs))]

    def fail_all(self, message: str) -> Outbox:
        """Fail every running sequence (a batched forward failed); returns their items."""
        out: Outbox = []
        for seq in list(self._running):
            if not seq.finished:
                self._fail(seq, message, out)
        self._running = []
        end_lockstep(self)
        return out

    # ------------------------------------------------------------------ lockstep (`LockstepHost`)
    def waiting_count(self) -> int:
        return len(self._waiting)

    def take_waiting(self) -> list[EngineSequence]:
        seqs = list(self._waiting)
        self._waiting.clear()
        return seqs

    def take_slot(self, seq: EngineSequence) -> None:
        """Give a waiting sequence the next free slot (0 first) and fresh sampling state."""
        slot = seq.slot = self._free_slots.pop()
        self._on_admitted(seq)
        self._running.append(seq)
        self._state.reset(slot, seq.spec.prompt, seq.spec.params)

    def free_every_slot(self) -> None:
        self._free_slots = list(range(self.config.max_slots - 1, -1, -1))

    def check_cache(self, rows: int, length: int) -> None:
        cache = self.model.cache
        if cache is None or cache.max_batch_size < rows or cache.max_seq_len < length:
            have = "none" if cache is None else f"{cache.max_batch_size} x {cache.max_seq_len}"
            raise GenerationError(
                f"the model's KV cache ({have}) is too small; expected at least {rows} rows of "
                f"{length} positions (call setup_caches first)"
            )

    # ------------------------------------------------------------------ model steps
    def _admit(self, out: Outbox) -> None:
        for _ in range(admit_count(len(self._waiting), len(self._free_slots))):
            seq = self._waiting.popleft()
            self.take_slot(seq)
            if seq.spec.max_tokens == 0 and not seq.want_prompt_lp:
                self.finish_sequence(seq, seq.state.finish_without_step(), out)

    def _on_admitted(self, seq: EngineSequence) -> None:
        """Hook: a waiting sequence got a slot."""

    def _prefill_chunk(self, seq: EngineSequence, start: int, end: int, out: Outbox) -> None:
        """Run prompt positions start..end-1 of `seq` alone (batch-invariant)."""
        prompt = seq.spec.prompt
        tokens = torch.tensor([prompt[start:end]], dtype=torch.long, device=self.device)  # (1, T)
        start_pos = torch.tensor([start], dtype=torch.long, device=self.device)  # (1,)
        slots = torch.tensor([seq.slot], dtype=torch.long, device=self.device)  # (1,)
        last_chunk = end == len(prompt)
        last: Tensor | None = None
        if seq.want_prompt_lp:
            logits = self.model(tokens, start_pos, slots)[0].float()  # (T, V)
            self._record_prompt_logprobs(seq, start, end, logits)
            last = logits[-1:]  # (1, V)
        elif last_chunk:
            h = self.model.hidden_states(tokens, start_pos, slots)[:, -1:]  # (1, 1, dim)
            last = self.model.output(h)[:, 0].float()  # (1, V)
        else:
            self.model.hidden_states(tokens, start_pos, slots)  # fills the cache; no head needed
        seq.pos = end
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(end - start)
        if last_chunk and seq.want_prompt_lp:
            out.append((seq.owner, PromptLogprobs(seq.index, seq.prompt_lp, seq.prompt_top)))
        if last_chunk and last is not None:
            if seq.spec.max_tokens == 0:  # echo + logprobs with nothing to generate
                self.finish_sequence(seq, seq.state.finish_without_step(), out)
            else:
                self.sample_and_emit([seq], last, out)

    def _record_prompt_logprobs(self, seq: EngineSequence, start: int, end: int, logits: Tensor) -> None:
        """logits (T, V) of positions start..end-1 predict prompt tokens start+1..end."""
        prompt = seq.spec.prompt
        stop = min(end + 1, len(prompt))
        n = stop - (start + 1)  # how many prompt tokens these logits predict
        if n <= 0:
            return
        targets = torch.tensor(prompt[start + 1 : stop], dtype=torch.long, device=logits.device)  # (n,)
        values, tops = token_logprobs(logits[:n], targets, seq.spec.logprobs or 0)
        seq.prompt_lp[start + 1 : stop] = values
        if seq.prompt_top is not None:
            seq.prompt_top[start + 1 : stop] = tops

    def _decode(self, seqs: list[EngineSequence], out: Outbox) -> None:
        b = len(seqs)
        rows = self.config.max_slots if self.decode_step is not None else self.config.min_decode_rows
        pad = max(0, rows - b)
        tokens = torch.tensor(
            [[s.last_token] for s in seqs] + [[0]] * pad, dtype=torch.long, device=self.device
        )  # (B', 1)
        start_pos = torch.tensor(
            [s.pos for s in seqs] + [0] * pad, dtype=torch.long, device=self.device
        )  # (B',)
        slots = torch.tensor(
            [s.slot for s in seqs] + [self.scratch_slot] * pad, dtype=torch.long, device=self.device
        )  # (B',)
        if self.decode_step is not None:  # fixed shapes: one compiled graph for every step
            logits = self.decode_step(tokens, start_pos, slots)[:b]  # (B, V)
        else:
            logits = self.model(tokens, start_pos, slots)[:b, 0].float()  # (B, V)
        for s in seqs:
            s.pos += 1
        self.sample_and_emit(seqs, logits, out)

    # ------------------------------------------------------------------ sampling
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
        """Sample one token per row of raw logits (B, V) and pass it to each sequence's stop rules.

        Args:
            seqs: the rows' sequences.
            logits: (B, V) raw logits.
            out: where the items go.
            slots: the rows' sampling-state rows (default: each sequence's slot).
            active: rows that really generate (default all); the others take part in a batch-wide
                draw (Meta's order) but emit nothing and keep their penalty state.
            forced: (mask (B,) bool, tokens (B,)): where mask is True the row takes that token
                instead of the sample (lockstep rows still inside their prompt).

        Returns:
            (B,) int64 the chosen (or forced) token of every row.
        """
        params = [s.spec.params for s in seqs]
        act = active if active is not None else [True] * len(seqs)
        slot_ids = slots if slots is not None else [s.slot for s in seqs]
        slots_t = torch.tensor(slot_ids, dtype=torch.long, device=self.device)  # (B,)
        x = process_logits(logits, params, *self._state.gather(slots_t, params))  # (B, V)
        x = finite_logits(x)  # (B, V): NaN never chosen, +inf rows reduced to their +inf tokens
        # A row with no token left (everything banned, or NaN logits) fails alone; the rest go on.
        empty = (x == NEG_INF).all(dim=-1).tolist()  # (B,)
        if any(empty):  # a placeholder distribution; the row's token is never used
            x = x.masked_fill(torch.tensor(empty, device=self.device)[:, None], 0.0)
        dead = [e and a for e, a in zip(empty, act, strict=True)]
        live = [a and not d for a, d in zip(act, dead, strict=True)]
        chosen = sample_tokens(x, params, [s.generator for s in seqs], live)  # (B,)
        if forced is not None:
            chosen = torch.where(forced[0], forced[1], chosen)  # (B,)
        tokens = chosen.tolist()

        lps: list[float | None] = [None] * len(seqs)
        tops: list[dict[int, float] | None] = [None] * len(seqs)
        lp_rows = [i for i, s in enumerate(seqs) if s.spec.logprobs is not None and act[i]]
        if lp_rows:
            ks = [seqs[i].spec.logprobs or 0 for i in lp_rows]
            got, got_tops = token_logprobs(logits[lp_rows], chosen[lp_rows], ks)
            for j, i in enumerate(lp_rows):
                lps[i], tops[i] = got[j], got_tops[j]

        # Penalty state: the token is now part of the sequence (rows that generated it only).
        if all(live):
            self._state.record(slots_t, chosen)
        else:
            keep = torch.tensor(live, device=self.device)  # (B,)
            self._state.record(slots_t[keep], chosen[keep])

        now = time.monotonic()
        n_ok = 0
        for seq, tok, lp, top, is_dead, is_active in zip(seqs, tokens, lps, tops, dead, act, strict=True):
            if not is_active:
                continue
            if is_dead:
                self._fail(
                    seq,
                    "no token can be chosen (every logit is -inf or NaN: all tokens banned by "
                    "logit_bias, or the model produced NaN); expected at least one finite logit",
                    out,
                )
                continue
            try:
                event = self._accept_token(seq, tok, lp, top)
            except Exception as e:
                log.exception("post-processing failed for one sequence")
                self._fail(seq, f"internal error while processing a token: {type(e).__name__}: {e}", out)
                continue
            n_ok += 1
            seq.sampled += 1
            seq.last_token = tok
            if seq.t_first is None:
                seq.t_first = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - seq.t_submit)
            if event.finish_reason is not None:
                self.finish_sequence(seq, event, out)
            else:
                out.append((seq.owner, event))
        if self.metrics is not None and n_ok:
            self.metrics.generation_tokens.inc(n_ok)
            self.metrics.generated_rate.add(n_ok, now)
        return chosen

    def _accept_token(
        self, seq: EngineSequence, token: int, logprob: float | None, top: dict[int, float] | None
    ) -> TokenEvent:
        """Apply stop rules and detokenization to one sampled token (per sequence; may raise)."""
        return seq.state.accept(token, logprob, top)

    # ------------------------------------------------------------------ endings
    def finish_sequence(self, seq: EngineSequence, event: TokenEvent, out: Outbox) -> None:
        result = seq.state.result
        if seq.want_prompt_lp:
            result.prompt_logprobs = seq.prompt_lp
        out.append((seq.owner, event))
        out.append((seq.owner, SequenceDone(seq.index, result, seq.sampled, seq.prompt_top)))
        self.release_sequence(seq, result.finish_reason)

    def _fail(self, seq: EngineSequence, message: str, out: Outbox) -> None:
        out.append((seq.owner, SequenceFailed(seq.index, message)))
        self.release_sequence(seq, "error")

    def release_sequence(self, seq: EngineSequence, reason: str) -> None:
        if seq.finished and seq.slot is None:
            return
        seq.finished = True
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None
        if seq in self._running:
            self._running.remove(seq)
        self._count_finished(reason)

    def _count_finished(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.sequences_finished.inc(reason=reason)
