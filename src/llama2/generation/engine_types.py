"""The step engine's types (`llama2.generation.engine` re-exports them): what a caller submits
(`SequenceSpec`), the budgets (`EngineConfig`), the items a step produces and the per-sequence
state (`EngineSequence`)."""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llama2.errors import GenerationError
from llama2.generation.sampling import SamplingParams, seeded_generator
from llama2.generation.sequence import (
    Detokenizer,
    GenerationResult,
    InfillDetokenizer,
    SequenceState,
    TokenEvent,
)
from llama2.tokenizer import StreamingDetokenizer, Tokenizer


class _Counter(Protocol):
    def inc(self, amount: float = 1.0, **labels: str) -> None: ...


class _Histogram(Protocol):
    def observe(self, value: float) -> None: ...


class _Rate(Protocol):
    def add(self, n: int, now: float | None = None) -> None: ...


class EngineMetrics(Protocol):
    """What the engine reports to (`llama2.serve.metrics.ServeMetrics` provides it)."""

    @property
    def prompt_tokens(self) -> _Counter: ...
    @property
    def generation_tokens(self) -> _Counter: ...
    @property
    def sequences_finished(self) -> _Counter: ...
    @property
    def ttft(self) -> _Histogram: ...
    @property
    def generated_rate(self) -> _Rate: ...


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine's fixed budgets.

    Attributes:
        max_slots: KV-cache rows, i.e. sequences decoded concurrently.
        max_seq_len: positions per row (the context window); None: the model's `args.max_seq_len`.
        max_queue: sequences allowed to wait for a slot (beyond those the free slots take at the
            next step); more are refused (`llama2.scheduling.queue_has_room`).
        prefill_chunk: prompt tokens per prefill forward.
        prefill_budget: prompt tokens prefilled per engine step, over all waiting prompts (at least
            one chunk is always run).
        min_decode_rows: decode batches are padded to this many rows (see the module docstring).
        cache_dtype: KV-cache dtype; None: the model's dtype.
        compile: decode through `decode.DecodeStep` compiled with this `torch.compile` mode (one of
            `decode.COMPILE_MODES`); decode batches are then padded to `max_slots` rows, so one graph
            serves every step. None: eager decoding.
        caller_cache: run in the model's existing KV cache (the caller sets it up, e.g. Meta's
            `max_batch_size` rows) instead of allocating `max_slots + 1` rows.
        global_rng: an unseeded sequence draws from torch's global generator instead of a randomly
            seeded one of its own; when every row of a step is unseeded, one draw covers the whole
            batch in row order (Meta's order, reproducible after `torch.manual_seed`).
        lockstep: Meta's `generate` schedule (`lockstep.LockstepBatch`): the sequences waiting at a
            step are admitted together (at most `max_slots`) into cache rows 0..B-1, prefilled
            together up to the shortest prompt, then advanced one position per step for every row,
            a row still inside its prompt keeping its prompt token. The next batch starts when this
            one has ended.
    """

    max_slots: int = 8
    max_seq_len: int | None = None
    max_queue: int = 64
    prefill_chunk: int = 128
    prefill_budget: int = 256
    min_decode_rows: int = 4
    cache_dtype: torch.dtype | None = None
    compile: str | None = None
    caller_cache: bool = False
    global_rng: bool = False
    lockstep: bool = False

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_queue", "prefill_chunk", "prefill_budget", "min_decode_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GenerationError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise GenerationError(f"EngineConfig.max_seq_len must be >= 1, got {self.max_seq_len}")


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
    """The last item a sequence produces.

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
    """Produced once a prompt is prefilled when the sequence asked for echo with logprobs.

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


EngineItem = TokenEvent | PromptLogprobs | SequenceDone | SequenceFailed
# (owner, item): what one step produced, in order; `owner` is whatever `new_sequence` was given.
Outbox = list[tuple[object, EngineItem]]


class EngineSequence:
    """Engine-side state of one sequence: its `SequenceState`, slot, position and generator."""

    _ids = itertools.count()

    def __init__(
        self,
        owner: object,
        index: int,
        spec: SequenceSpec,
        tokenizer: Tokenizer,
        device: torch.device,
        *,
        detok: Detokenizer | None = None,
        global_rng: bool = False,
    ) -> None:
        """`detok`: the streaming detokenizer (default: from `tokenizer`, per `spec.infill`);
        `global_rng`: unseeded, draw from torch's global generator (see `EngineConfig`)."""
        self.id = next(self._ids)
        self.owner = owner
        self.index = index
        self.spec = spec
        if detok is None:
            detok = InfillDetokenizer(tokenizer) if spec.infill else StreamingDetokenizer(tokenizer)
        want_lp = spec.logprobs is not None
        self.state = SequenceState(
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
        seed = spec.params.seed
        if seed is None and not global_rng:
            seed = secrets.randbits(63)
        self.generator = seeded_generator(seed, device)  # None: torch's global generator
        self.want_prompt_lp = spec.echo and want_lp
        self.prompt_lp: list[float] = [0.0] * len(spec.prompt) if self.want_prompt_lp else []
        self.prompt_top: list[dict[int, float] | None] | None = (
            [None] * len(spec.prompt) if self.want_prompt_lp and (spec.logprobs or 0) > 0 else None
        )

    @property
    def prefilled(self) -> bool:
        return self.pos >= len(self.spec.prompt)
