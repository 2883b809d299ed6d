"""Continuous-batching engine: one background thread runs the model for every live sequence.

Each engine step:
  1. takes in new sequences and cancellations (thread-safe inboxes), frees cancelled slots;
  2. gives free KV-cache slots to waiting sequences (first come, first served);
  3. runs one decode step for every sequence that has finished its prompt: one forward of (B, 1)
     tokens with per-row positions (`start_pos` tensor) and cache rows (`slots` tensor);
  4. prefills waiting prompts in chunks of `prefill_chunk` tokens, at most `prefill_budget` prompt
     tokens per step, so one long prompt never stalls the running streams for more than a chunk.

Memory is a fixed budget: `max_slots` cache rows of `max_seq_len` positions, allocated once; a
sequence owns one row from admission until it ends (finished, cancelled or failed).

Batch invariance (a greedy request gives the same tokens alone or under load):
  - a prompt is always prefilled alone (batch of 1) in chunks at fixed offsets (0, C, 2C, ...), so
    its first token never depends on the rest of the batch;
  - decode batches are padded to at least `min_decode_rows` rows (padding rows write into a spare
    scratch cache row), because CPU BLAS uses different kernels for 1, 2-3 and >= 4 rows: with >= 4
    rows a row's result does not depend on how many other rows there are. What is left is attention
    over a longer masked key range (~1e-7 differences), far below the gaps greedy decoding decides on;
  - each sequence samples from its own seeded `torch.Generator`.

Tokens reach request handlers through asyncio queues: the engine collects a step's events and
hands them to the event loop with one `call_soon_threadsafe` per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llama2.errors import GenerationError, Llama2Error
from llama2.generation.generator import GenerationResult, TokenEvent, _RowState
from llama2.generation.sampling import (
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    finite_logits,
    is_greedy,
    min_p_mask,
    sample_top_p,
    scale_logits,
    top_k_mask,
)
from llama2.tokenizer import StreamingDetokenizer, Tokenizer

if TYPE_CHECKING:
    from llama2.model import Transformer
    from llama2.serve.metrics import ServeMetrics

log = logging.getLogger("llama2.serve")

class EngineOverloadedError(Llama2Error):
    """The waiting queue is full; the client should retry later (HTTP 429)."""


class EngineClosedError(Llama2Error):
    """The engine is shutting down and takes no new sequences (HTTP 503)."""


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine's fixed budgets.

    Attributes:
        max_slots: KV-cache rows, i.e. sequences decoded concurrently.
        max_seq_len: positions per row (the context window); None: the model's `args.max_seq_len`.
        max_queue: sequences allowed to wait for a slot (beyond those the free slots take at the
            next step); more are refused with `EngineOverloadedError`.
        prefill_chunk: prompt tokens per prefill forward.
        prefill_budget: prompt tokens prefilled per engine step, over all waiting prompts (at least
            one chunk is always run).
        min_decode_rows: decode batches are padded to this many rows (see the module docstring).
        cache_dtype: KV-cache dtype; None: the model's dtype.
    """

    max_slots: int = 8
    max_seq_len: int | None = None
    max_queue: int = 64
    prefill_chunk: int = 128
    prefill_budget: int = 256
    min_decode_rows: int = 4
    cache_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_queue", "prefill_chunk", "prefill_budget", "min_decode_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GenerationError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise GenerationError(f"EngineConfig.max_seq_len must be >= 2, got {self.max_seq_len}")


@dataclass(frozen=True)
class SequenceSpec:
    """One sequence to generate.

    Attributes:
        prompt: token ids (with BOS where wanted); non-empty, every id inside the vocabulary.
        max_tokens: most tokens to sample; `len(prompt) + max_tokens` must fit the context window.
        params: sampling settings (seed None: a random seed of the sequence's own generator).
        stop: strings that end generation (the text is cut before them).
        stop_token_ids: ids that end generation besides EOS (Code Llama's `▁<EOT>`).
        logprobs: None for no logprobs; k >= 0 for the chosen token's logprob and the k most likely.
        echo: include the prompt's text in the result (and, with logprobs, the prompt's logprobs).
        infill: decode the text as a Code Llama middle (keeps a leading space).
    """

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    echo: bool = False
    infill: bool = False


@dataclass(frozen=True)
class SequenceDone:
    """The last item a request's queue receives for one sequence.

    Attributes:
        index: the sequence's index within its request.
        result: tokens, text (with the prompt's in front when echoed), finish reason, logprobs.
        sampled_tokens: tokens sampled, the one that stopped generation (EOS / stop id) included.
        prompt_top_logprobs: with echo and top logprobs: per prompt token its alternatives (None for
            the first token).
    """

    index: int
    result: GenerationResult
    sampled_tokens: int
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass(frozen=True)
class PromptLogprobs:
    """Sent once a prompt is prefilled when the sequence asked for echo with logprobs.

    Attributes:
        index: the sequence's index within its request.
        logprobs: per prompt token its logprob given the tokens before it (the first one gets 0.0).
        top_logprobs: per prompt token its most likely alternatives (None for the first token), or
            None when no alternatives were asked for.
    """

    index: int
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None] | None


@dataclass(frozen=True)
class SequenceFailed:
    """A sequence hit an exception; the others keep running."""

    index: int
    message: str


QueueItem = TokenEvent | PromptLogprobs | SequenceDone | SequenceFailed


class InfillDetokenizer:
    """Streaming detokenizer for a Code Llama middle: like `decode_infilling`, keeps a leading space.

    Re-decodes the ids seen so far on each step (a middle is short) and emits the new complete text.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode_infilling(self._ids)
        if text.endswith("\ufffd") or len(text) <= self._emitted:
            return ""
        new, self._emitted = text[self._emitted :], len(text)
        return new

    def flush(self) -> str:
        text = self._tok.decode_infilling(self._ids)
        new = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        return new


class RequestHandle:
    """The asyncio side of one request: a queue of `QueueItem`s for all of its sequences."""

    def __init__(
        self, engine: Engine, loop: asyncio.AbstractEventLoop, specs: Sequence[SequenceSpec]
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.specs = list(specs)
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue()
        self.cancelled = False

    def cancel(self) -> None:
        """Cancel every unfinished sequence of this request; their slots are freed at the next step."""
        if not self.cancelled:
            self.cancelled = True
            self.engine.cancel(self)


class _Sequence:
    """Engine-side state of one sequence."""

    _ids = itertools.count()

    def __init__(self, handle: RequestHandle, index: int, spec: SequenceSpec, tokenizer: Tokenizer) -> None:
        self.id = next(self._ids)
        self.handle = handle
        self.index = index
        self.spec = spec
        detok = InfillDetokenizer(tokenizer) if spec.infill else StreamingDetokenizer(tokenizer)
        want_lp = spec.logprobs is not None
        self.state = _RowState(
            index,
            spec.prompt,
            spec.max_tokens,
            detok,
            spec.stop,
            frozenset([tokenizer.eos_id, *spec.stop_token_ids]),
            want_lp,
            want_lp and (spec.logprobs or 0) > 0,
            spec.echo,
        )
        self.slot: int | None = None
        self.pos = 0  # tokens written to the cache
        self.last_token: int | None = None  # sampled, not yet in the cache
        self.sampled = 0
        self.finished = False
        self.t_submit = time.monotonic()
        self.t_first: float | None = None
        seed = spec.params.seed if spec.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.want_prompt_lp = spec.echo and want_lp
        self.prompt_lp: list[float] = [0.0] * len(spec.prompt) if self.want_prompt_lp else []
        self.prompt_top: list[dict[int, float] | None] | None = (
            [None] * len(spec.prompt) if self.want_prompt_lp and (spec.logprobs or 0) > 0 else None
        )

    @property
    def prefilled(self) -> bool:
        return self.pos >= len(self.spec.prompt)


class Engine:
    """Continuous batching over a `Transformer` with a preallocated, slot-indexed KV cache.

    Example:
        >>> engine = Engine(model, tokenizer, EngineConfig(max_slots=8))
        >>> engine.start()
        >>> handle = engine.submit([SequenceSpec(prompt, 32)], asyncio.get_running_loop())
        >>> item = await handle.queue.get()   # TokenEvent ... then SequenceDone
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        metrics: ServeMetrics | None = None,
    ) -> None:
        """Allocate the KV cache (`max_slots` + 1 scratch row) and the per-slot sampling state.

        Raises:
            GenerationError: the tokenizer's vocabulary is larger than the model's, or the context
                window exceeds the model's.
        """
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.metrics = metrics
        args = model.args
        if tokenizer.vocab_size > args.vocab_size:
            raise GenerationError(
                f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                f"{args.vocab_size}; "
                "expected the tokenizer that belongs to the model"
            )
        self.vocab_size = args.vocab_size
        self.max_seq_len = self.config.max_seq_len or args.max_seq_len
        self.device = model.tok_embeddings.weight.device
        n = self.config.max_slots
        self.scratch_slot = n  # padding rows of decode batches write here
        model.setup_caches(n + 1, self.max_seq_len, dtype=self.config.cache_dtype)
        self._free_slots: list[int] = list(range(n - 1, -1, -1))  # pop() hands out slot 0 first
        # Per-slot sampling state, allocated on first use: (slots + 1, V) each.
        self._seen: Tensor | None = None
        self._counts: Tensor | None = None
        self._bias: Tensor | None = None

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: list[_Sequence] = []
        self._cancel_requests: list[RequestHandle] = []
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # hold a slot: prefilling or decoding
        self._n_queued = 0  # incoming + waiting (read by submit on the event-loop thread)
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        if metrics is not None:
            metrics.bind_engine(
                {
                    "waiting": lambda: float(self._n_queued),
                    "running": lambda: float(len(self._running)),
                    "slots_used": lambda: float(n - len(self._free_slots)),
                    "slots_total": lambda: float(n),
                    "tokens_used": lambda: float(sum(s.pos for s in list(self._running))),
                    "usage": lambda: (n - len(self._free_slots)) / n,
                }
            )

    # ------------------------------------------------------------------ thread-safe public API
    @property
    def context_window(self) -> int:
        return self.max_seq_len

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llama2-engine", daemon=True)
            self._thread.start()

    def submit(self, specs: Sequence[SequenceSpec], loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Queue the sequences of one request (all or none).

        Args:
            specs: the sequences; their prompts and limits must already be validated.
            loop: the event loop whose queue receives the items.

        Returns:
            The request's handle; its queue gets `TokenEvent`s and one `SequenceDone` or
            `SequenceFailed` per sequence.

        Raises:
            EngineClosedError: the engine is shutting down.
            EngineOverloadedError: accepting these sequences would exceed `max_queue`.
            GenerationError: a spec is invalid (empty prompt, id out of range, too long).
        """
        for spec in specs:
            self._check_spec(spec)
        handle = RequestHandle(self, loop, specs)
        seqs = [_Sequence(handle, i, spec, self.tokenizer) for i, spec in enumerate(specs)]
        with self._lock:
            if not self._accepting:
                raise EngineClosedError("the server is shutting down; retry on another instance")
            # Free slots absorb a burst at the next step; beyond them, `max_queue` may wait.
            if self._n_queued + len(seqs) > self.config.max_queue + len(self._free_slots):
                raise EngineOverloadedError(
                    f"the request queue is full ({self._n_queued} sequences waiting, limit "
                    f"{self.config.max_queue}); retry later"
                )
            self._n_queued += len(seqs)
            self._incoming.extend(seqs)
        self._wake.set()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Cancel a request's sequences; the engine frees their slots at its next step."""
        with self._lock:
            self._cancel_requests.append(handle)
        self._wake.set()

    def stats(self) -> dict[str, int]:
        """Current counts: waiting, running, free slots, cache positions in use."""
        running = list(self._running)
        return {
            "waiting": self._n_queued,
            "running": len(running),
            "free_slots": len(self._free_slots),
            "cache_tokens": sum(s.pos for s in running),
        }

    def idle(self) -> bool:
        with self._lock:
            return self._n_queued == 0 and not self._running

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop taking sequences, let live ones finish (up to `drain_timeout` s), then stop the thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while not self.idle() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        # Anything left (drain timed out) is failed so that no handler waits forever.
        out: list[tuple[RequestHandle, QueueItem]] = []
        with self._lock:
            leftover = [*self._incoming, *self._waiting, *self._running]
            self._incoming.clear()
            self._waiting.clear()
            self._running = []
            self._n_queued = 0
        for seq in leftover:
            if not seq.finished:
                seq.finished = True
                out.append(
                    (seq.handle, SequenceFailed(seq.index, "the server shut down before this finished"))
                )
        self._deliver(out)

    # ------------------------------------------------------------------ validation
    def _check_spec(self, spec: SequenceSpec) -> None:
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

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while True:
                self._wake.clear()
                try:
                    self._take_commands()
                except Exception:  # never let the engine thread die: handlers would wait forever
                    log.exception("engine bookkeeping failed")
                if self._stop:
                    return
                if not self._waiting and not self._running:
                    self._wake.wait(0.5)
                    continue
                t0 = time.monotonic()
                try:
                    self._step()
                except Exception as e:  # a batched forward failed: fail the live sequences, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"internal error in the model step: {type(e).__name__}: {e}")
                self.steps += 1
                if self.metrics is not None:
                    self.metrics.step_time.observe(time.monotonic() - t0)

    def _take_commands(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancels, self._cancel_requests = self._cancel_requests, []
            self._waiting.extend(incoming)
        if not cancels:
            return
        handles = {id(h) for h in cancels}
        kept: deque[_Sequence] = deque()
        for seq in self._waiting:
            if id(seq.handle) in handles:
                seq.finished = True
                self._count_finished("cancelled")
                with self._lock:
                    self._n_queued -= 1
            else:
                kept.append(seq)
        self._waiting = kept
        for seq in list(self._running):
            if id(seq.handle) in handles:
                self._release(seq, "cancelled")

    def _admit(self, out: list[tuple[RequestHandle, QueueItem]]) -> None:
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            slot = self._free_slots.pop()
            seq.slot = slot
            with self._lock:
                self._n_queued -= 1
            self._running.append(seq)
            self._init_slot_state(seq)
            if seq.spec.max_tokens == 0 and not seq.want_prompt_lp:
                self._finish(seq, seq.state.finish_without_step(), out)

    def _step(self) -> None:
        out: list[tuple[RequestHandle, QueueItem]] = []
        self._admit(out)
        decoding = [s for s in self._running if s.prefilled and not s.finished]
        if decoding:
            self._decode(decoding, out)
        budget = self.config.prefill_budget
        for seq in [s for s in self._running if not s.prefilled and not s.finished]:  # first come first
            while budget > 0 and not seq.prefilled and not seq.finished:
                try:
                    budget -= self._prefill_chunk(seq, out)
                except Exception as e:
                    log.exception("prefill failed for one sequence")
                    self._fail(seq, f"internal error while reading the prompt: {type(e).__name__}: {e}", out)
            if budget <= 0:
                break
        self._running = [s for s in self._running if not s.finished]
        self._deliver(out)

    def _prefill_chunk(self, seq: _Sequence, out: list[tuple[RequestHandle, QueueItem]]) -> int:
        """Run the next prompt chunk of `seq` (fixed offsets: batch-invariant); returns its length."""
        prompt = seq.spec.prompt
        start = seq.pos
        end = min(start + self.config.prefill_chunk, len(prompt))
        tokens = torch.tensor([prompt[start:end]], dtype=torch.long, device=self.device)  # (1, T)
        start_pos = torch.tensor([start], dtype=torch.long, device=self.device)  # (1,)
        slots = torch.tensor([seq.slot], dtype=torch.long, device=self.device)  # (1,)
        last_chunk = end == len(prompt)
        if seq.want_prompt_lp:
            logits = self.model(tokens, start_pos, slots)[0].float()  # (T, V)
            self._record_prompt_logprobs(seq, start, end, logits)
            last = logits[-1:]  # (1, V)
        elif last_chunk:
            h = self.model.hidden_states(tokens, start_pos, slots)[:, -1:]  # (1, 1, dim)
            last = self.model.output(h)[:, 0].float()  # (1, V)
        else:
            self.model.hidden_states(tokens, start_pos, slots)  # fills the cache; no head needed
            last = None
        seq.pos = end
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(end - start)
        if last_chunk and seq.want_prompt_lp:
            out.append((seq.handle, PromptLogprobs(seq.index, seq.prompt_lp, seq.prompt_top)))
        if last_chunk and last is not None:
            if seq.spec.max_tokens == 0:  # echo + logprobs with nothing to generate
                self._finish(seq, seq.state.finish_without_step(), out)
            else:
                self._sample_and_emit([seq], last, out)
        return end - start

    def _record_prompt_logprobs(self, seq: _Sequence, start: int, end: int, logits: Tensor) -> None:
        """logits (T, V) of positions start..end-1 predict prompt tokens start+1..end."""
        prompt = seq.spec.prompt
        stop = min(end + 1, len(prompt))
        n = stop - (start + 1)  # how many prompt tokens these logits predict
        if n <= 0:
            return
        lsm = torch.log_softmax(logits[:n], dim=-1)  # (n, V)
        targets = torch.tensor(prompt[start + 1 : stop], dtype=torch.long, device=lsm.device)  # (n,)
        values = lsm.gather(-1, targets[:, None]).squeeze(-1).tolist()
        seq.prompt_lp[start + 1 : stop] = values
        if seq.prompt_top is not None:
            k = seq.spec.logprobs or 0
            vals, idx = torch.topk(lsm, k, dim=-1)  # (n, k) each
            for j, (ix, vs) in enumerate(zip(idx.tolist(), vals.tolist(), strict=True)):
                seq.prompt_top[start + 1 + j] = dict(zip(ix, vs, strict=True))

    def _decode(self, seqs: list[_Sequence], out: list[tuple[RequestHandle, QueueItem]]) -> None:
        b = len(seqs)
        pad = max(0, self.config.min_decode_rows - b)
        tokens = torch.tensor(
            [[s.last_token] for s in seqs] + [[0]] * pad, dtype=torch.long, device=self.device
        )  # (B', 1)
        start_pos = torch.tensor(
            [s.pos for s in seqs] + [0] * pad, dtype=torch.long, device=self.device
        )  # (B',)
        slots = torch.tensor(
            [s.slot for s in seqs] + [self.scratch_slot] * pad, dtype=torch.long, device=self.device
        )  # (B',)
        logits = self.model(tokens, start_pos, slots)[:b, 0].float()  # (B, V)
        for s in seqs:
            s.pos += 1
        self._sample_and_emit(seqs, logits, out)

    # ------------------------------------------------------------------ sampling
    def _ensure_state(self, kind: str) -> Tensor:
        rows = self.config.max_slots + 1
        if kind == "seen":
            if self._seen is None:
                self._seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=self.device)
            return self._seen
        if kind == "counts":
            if self._counts is None:
                self._counts = torch.zeros(rows, self.vocab_size, dtype=torch.int32, device=self.device)
            return self._counts
        if self._bias is None:
            self._bias = torch.zeros(rows, self.vocab_size, dtype=torch.float32, device=self.device)
        return self._bias

    def _init_slot_state(self, seq: _Sequence) -> None:
        p = seq.spec.params
        slot = seq.slot
        if slot is None:
            raise RuntimeError("internal error: a sequence's sampling state set up before its slot")
        if p.repetition_penalty != 1.0:
            seen = self._ensure_state("seen")
            seen[slot] = False
            seen[slot, torch.tensor(seq.spec.prompt, dtype=torch.long, device=self.device)] = True
        if p.presence_penalty or p.frequency_penalty:
            self._ensure_state("counts")[slot] = 0
        if p.logit_bias:
            bias = self._ensure_state("bias")
            bias[slot] = 0.0
            for tok, value in p.logit_bias.items():
                bias[slot, int(tok)] = float(value)

    def _sample_and_emit(
        self, seqs: list[_Sequence], logits: Tensor, out: list[tuple[RequestHandle, QueueItem]]
    ) -> None:
        """Sample one token per row of logits (B, V) and pass it to each sequence's stop rules."""
        params = [s.spec.params for s in seqs]
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=self.device)  # (B,)

        def column(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]  # (B, 1)

        x = logits
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = self._ensure_state("seen")[slots]  # (B, V)
            x = apply_repetition_penalty(x, seen, column([p.repetition_penalty for p in params]))
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            counts = self._ensure_state("counts")[slots]  # (B, V)
            x = apply_presence_frequency_penalty(
                x,
                counts,
                column([p.presence_penalty for p in params]),
                column([p.frequency_penalty for p in params]),
            )
        if any(p.logit_bias for p in params):
            x = x + self._ensure_state("bias")[slots]
        x = finite_logits(x)  # (B, V) float32: NaN never chosen, +inf rows reduced to their +inf tokens
        chosen = x.argmax(dim=-1)  # (B,)
        # One greedy rule for every caller (sampling.is_greedy).
        sampled_rows = [i for i, p in enumerate(params) if not is_greedy(p.temperature)]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, dtype=torch.long, device=self.device)
            sub = [params[i] for i in sampled_rows]
            y = scale_logits(x[rows], column([p.temperature for p in sub]))  # (b, V)
            if any(p.top_k > 0 for p in sub):
                y = top_k_mask(y, torch.tensor([p.top_k for p in sub], dtype=torch.long, device=self.device))
            if any(p.min_p > 0 for p in sub):
                y = min_p_mask(y, column([p.min_p for p in sub]))
            probs = torch.softmax(y, dim=-1)  # (b, V)
            # A row whose distribution is not finite (extreme settings) falls back to its argmax instead
            # of failing the whole batch inside torch.multinomial.
            broken = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)  # (b,)
            if bool(broken.any()):
                fallback = torch.zeros_like(probs[broken])
                fallback.scatter_(-1, chosen[rows][broken][:, None], 1.0)
                probs[broken] = fallback
            top_p = column([p.top_p if p.top_p < 1.0 else float("inf") for p in sub])
            picks = sample_top_p(probs, top_p, [seqs[i].generator for i in sampled_rows]).squeeze(-1)  # (b,)
            chosen[rows] = picks
        tokens = chosen.tolist()

        lps: list[float | None] = [None] * len(seqs)
        tops: list[dict[int, float] | None] = [None] * len(seqs)
        lp_rows = [i for i, s in enumerate(seqs) if s.spec.logprobs is not None]
        if lp_rows:
            lsm = torch.log_softmax(logits[lp_rows], dim=-1)  # (b, V)
            chosen_lp = lsm.gather(-1, chosen[lp_rows][:, None]).squeeze(-1).tolist()
            kmax = max(seqs[i].spec.logprobs or 0 for i in lp_rows)
            top_vals: list[list[float]] = []
            top_idx: list[list[int]] = []
            if kmax > 0:
                tv, ti = torch.topk(lsm, kmax, dim=-1)  # (b, kmax)
                top_vals, top_idx = tv.tolist(), ti.tolist()
            for j, i in enumerate(lp_rows):
                lps[i] = chosen_lp[j]
                k = seqs[i].spec.logprobs or 0
                if k > 0:
                    tops[i] = dict(zip(top_idx[j][:k], top_vals[j][:k], strict=True))

        # Penalty state: the token is now part of the sequence.
        if self._seen is not None or self._counts is not None:
            tok_t = torch.tensor(tokens, dtype=torch.long, device=self.device)  # (B,)
            if self._seen is not None:
                self._seen[slots, tok_t] = True
            if self._counts is not None:
                self._counts[slots, tok_t] += 1

        now = time.monotonic()
        n_ok = 0
        for seq, tok, lp, top in zip(seqs, tokens, lps, tops, strict=True):
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
                self._finish(seq, event, out)
            else:
                out.append((seq.handle, event))
        if self.metrics is not None and n_ok:
            self.metrics.generation_tokens.inc(n_ok)
            self.metrics.generated_rate.add(n_ok, now)

    def _accept_token(
        self, seq: _Sequence, token: int, logprob: float | None, top: dict[int, float] | None
    ) -> TokenEvent:
        """Apply stop rules and detokenization to one sampled token (per sequence; may raise)."""
        return seq.state.accept(token, logprob, top)

    # ------------------------------------------------------------------ endings
    def _finish(self, seq: _Sequence, event: TokenEvent, out: list[tuple[RequestHandle, QueueItem]]) -> None:
        result = seq.state.result
        if seq.want_prompt_lp:
            result.prompt_logprobs = seq.prompt_lp
        out.append((seq.handle, event))
        out.append((seq.handle, SequenceDone(seq.index, result, seq.sampled, seq.prompt_top)))
        self._release(seq, result.finish_reason)

    def _fail(self, seq: _Sequence, message: str, out: list[tuple[RequestHandle, QueueItem]]) -> None:
        out.append((seq.handle, SequenceFailed(seq.index, message)))
        self._release(seq, "error")

    def _fail_all(self, message: str) -> None:
        out: list[tuple[RequestHandle, QueueItem]] = []
        for seq in list(self._running):
            if not seq.finished:
                self._fail(seq, message, out)
        self._running = []
        self._deliver(out)

    def _release(self, seq: _Sequence, reason: str) -> None:
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

    # ------------------------------------------------------------------ delivery
    @staticmethod
    def _deliver(items: list[tuple[RequestHandle, QueueItem]]) -> None:
        """Hand a step's items to their event loops (one thread-safe callback per loop)."""
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list[tuple[RequestHandle, QueueItem]]]] = {}
        for handle, item in items:
            if handle.cancelled:
                continue
            by_loop.setdefault(id(handle.loop), (handle.loop, []))[1].append((handle, item))
        for loop, batch in by_loop.values():
            with contextlib.suppress(RuntimeError):  # the loop is closed (server stopping)
                loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[RequestHandle, QueueItem]]) -> None:
    for handle, item in batch:
        handle.queue.put_nowait(item)
