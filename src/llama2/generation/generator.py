"""`Generator`: batched generation as a Python generator of token events, a thin driver of the one
step engine (`engine.StepEngine`) that the server and RL rollouts drive too.

It runs the engine in Meta's lockstep schedule (`lockstep.LockstepBatch`) inside the model's own KV
cache (rows 0..B-1, as Meta's `max_batch_size`), with unseeded rows drawing from torch's global
generator in Meta's order (one draw over the whole batch per step), so `Llama.generate` after
`torch.manual_seed` gives Meta's tokens. Sampling (`sampling.process_logits` / `sample_tokens`),
seeding (`sampling.seeded_generator`), logprobs (`logprobs`) and stop / holdback rules
(`sequence.SequenceState`) are the engine's, so a seeded request gives the same tokens through both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, cast

import torch

from llama2.errors import GenerationError
from llama2.generation.decode import DecodeStep
from llama2.generation.engine import EngineConfig, SequenceFailed, SequenceSpec, StepEngine
from llama2.generation.sampling import SamplingParams
from llama2.generation.sequence import (
    Detokenizer,
    FinishReason,
    GenerationResult,
    SequenceState,
    TokenEvent,
    TokenizerLike,
)

if TYPE_CHECKING:
    from llama2.model import Transformer
    from llama2.tokenizer import Tokenizer

# The shared types live in `sequence`; they stay importable from here.
__all__ = [
    "CACHE_ROUND",
    "Detokenizer",
    "FinishReason",
    "GenerationResult",
    "Generator",
    "TokenEvent",
    "TokenizerLike",
]


# With a compiled decode step the KV cache length is rounded up to a multiple of this, so that
# generations of similar lengths reuse one cache (and one compiled graph).
CACHE_ROUND = 256


def _default_detokenizer(tokenizer: TokenizerLike) -> Detokenizer:
    from llama2.tokenizer import StreamingDetokenizer

    detok: Detokenizer = StreamingDetokenizer(tokenizer)
    return detok


class Generator:
    """Batched text generation with a `Transformer` and a tokenizer.

    Example:
        >>> gen = Generator(model, tokenizer)
        >>> [r] = gen.generate([tokenizer.encode("Hello", bos=True, eos=False)], 32,
        ...                    SamplingParams(temperature=0.7, top_p=0.9, seed=1))
        >>> r.text
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: TokenizerLike,
        *,
        max_seq_len: int | None = None,
        detokenizer_factory: Callable[[TokenizerLike], Detokenizer] | None = None,
        compile: bool | str = False,
    ) -> None:
        """Wrap a model and tokenizer.

        Args:
            model: the decoder; its KV cache is used when large enough, else `generate` allocates
                a scratch cache in it (`setup_caches(strict=False)`, kept for reuse). Nothing the
                generation creates is an inference tensor, so the model trains right afterwards.
            tokenizer: supplies `eos_id` and decoding.
            max_seq_len: context window in tokens (default: the model's `args.max_seq_len`).
            detokenizer_factory: builds the streaming detokenizer for a sequence (default:
                `llama2.tokenizer.StreamingDetokenizer`).
            compile: run one-token decode steps through `torch.compile` (True: mode "default", or
                a mode name from `llama2.generation.decode.COMPILE_MODES`). The first generation
                pays the compilation (minutes on a small CPU, once per batch size and cache shape);
                the KV cache is then kept at a fixed size (rounded up to CACHE_ROUND positions).
        """
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len if max_seq_len is not None else model.args.max_seq_len
        if self.max_seq_len <= 0:
            raise GenerationError(f"max_seq_len must be positive, got {self.max_seq_len}")
        self.detokenizer_factory = detokenizer_factory or _default_detokenizer
        mode = "default" if compile is True else (compile or None)
        self.decode_step: DecodeStep | None = DecodeStep(model, compile=mode) if mode else None

    # ------------------------------------------------------------------------------ public
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        echo: bool = False,
    ) -> list[GenerationResult]:
        """Generate a continuation for every prompt (see `stream` for the arguments).

        Returns:
            One `GenerationResult` per prompt, in order.
        """
        rows: list[SequenceState] = []
        for _ in self._run(
            prompts, max_new_tokens, params, stop, stop_token_ids, logprobs, top_logprobs, echo, rows
        ):
            pass
        return [r.result for r in rows]

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        echo: bool = False,
    ) -> Iterator[TokenEvent]:
        """Yield a `TokenEvent` per decoding step and running sequence; the last one of each
        sequence has its `finish_reason` set.

        Args:
            prompts: token ids per sequence (with BOS if wanted); lengths may differ.
            max_new_tokens: at most this many tokens per sequence; also bounded by the context
                window (`max_seq_len - len(prompt)`).
            params: one `SamplingParams` for all sequences or one per sequence (default: greedy).
            stop: strings that end generation; the text is cut before the stop string.
            stop_token_ids: token ids that end generation besides EOS (e.g. Code Llama's `▁<EOT>`).
            logprobs: report the log-softmax of the raw model logits (before penalties, temperature
                and filters) at each chosen token.
            top_logprobs: also report this many most likely tokens per step (implies `logprobs`).
            echo: include the prompt's text in the result and, with `logprobs`, the prompt's logprobs.

        Raises:
            GenerationError: empty prompt, prompt longer than the context window, token id outside
                the vocabulary, or invalid arguments.
        """
        yield from self._run(
            prompts, max_new_tokens, params, stop, stop_token_ids, logprobs, top_logprobs, echo, []
        )

    # ------------------------------------------------------------------------------ internals
    def _ensure_cache(self, batch: int, length: int) -> None:
        cache = self.model.cache
        if cache is None or cache.max_batch_size < batch or cache.max_seq_len < length:
            if self.decode_step is not None:  # a fixed size, so the compiled graph is reused
                length = max(length, min(self.max_seq_len, -(-length // CACHE_ROUND) * CACHE_ROUND))
            self.model.setup_caches(batch, length, strict=False)  # scratch: never in training's way

    def _validate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, top_logprobs: int
    ) -> list[list[int]]:
        if not prompts:
            raise GenerationError("no prompts given; expected at least one list of token ids")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        vocab = self.model.args.vocab_size
        if not 0 <= top_logprobs <= vocab:
            raise GenerationError(f"top_logprobs must be in [0, {vocab}], got {top_logprobs}")
        out: list[list[int]] = []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in p]
            if not ids:
                raise GenerationError(f"prompt {i} is empty; expected at least one token (e.g. BOS)")
            if len(ids) > self.max_seq_len:
                raise GenerationError(
                    f"prompt {i} has {len(ids)} tokens but the context window is {self.max_seq_len}; "
                    "shorten the prompt or use a longer max_seq_len"
                )
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
            out.append(ids)
        return out

    def _run(
        self,
        prompts_in: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams | Sequence[SamplingParams] | None,
        stop: Sequence[str],
        stop_token_ids: Sequence[int],
        logprobs: bool,
        top_logprobs: int,
        echo: bool,
        rows: list[SequenceState],
    ) -> Iterator[TokenEvent]:
        """Drive a lockstep `StepEngine` over the model's cache (rows 0..B-1) and yield its events."""
        prompts = self._validate(prompts_in, max_new_tokens, top_logprobs)
        bsz = len(prompts)
        if params is None:
            params = SamplingParams(temperature=0.0)
        plist = [params] * bsz if isinstance(params, SamplingParams) else list(params)
        if len(plist) != bsz:
            raise GenerationError(f"got {len(plist)} SamplingParams for {bsz} prompts; expected one or {bsz}")
        if isinstance(stop, str):
            stop = [stop]
        want_lp = logprobs or top_logprobs > 0
        specs = [
            SequenceSpec(
                prompt=p,
                max_tokens=min(max_new_tokens, self.max_seq_len - len(p)),
                params=plist[i],
                stop=tuple(stop),
                stop_token_ids=tuple(stop_token_ids),
                logprobs=top_logprobs if want_lp else None,
                echo=echo,
            )
            for i, p in enumerate(prompts)
        ]
        config = EngineConfig(
            max_slots=bsz, max_seq_len=self.max_seq_len, caller_cache=True, global_rng=True, lockstep=True
        )
        # The engine reads only `eos_id` from the tokenizer: the detokenizers come from the factory.
        tokenizer = cast("Tokenizer", self.tokenizer)
        engine = StepEngine(self.model, tokenizer, config, decode_step=self.decode_step)
        owner = object()
        seqs = [
            engine.new_sequence(owner, i, spec, self.detokenizer_factory(self.tokenizer))
            for i, spec in enumerate(specs)
        ]
        rows.extend(s.state for s in seqs)
        engine.add(seqs)
        # Inference mode is entered per step, never across a `yield`: it is thread-local state and
        # must not leak into the consumer's code while the generator is suspended.
        with torch.inference_mode():
            self._ensure_cache(bsz, max(len(p) + s.max_tokens for p, s in zip(prompts, specs, strict=True)))
        while engine.has_work():
            with torch.inference_mode():
                out = engine.step()
            for _, item in out:
                if isinstance(item, TokenEvent):
                    yield item
                elif isinstance(item, SequenceFailed):
                    raise GenerationError(f"sequence {item.index}: {item.message}")
