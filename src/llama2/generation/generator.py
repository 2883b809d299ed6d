"""Prefill + decode loop over the model's KV cache, written as a Python generator of token events.

Batching follows Meta's reference: prompts are right-padded into one (B, total_len) buffer, the
first forward covers the shortest prompt, and each later step feeds one column; a row still inside
its prompt keeps its prompt token instead of the sample. No padding ever enters the model, so every
row gets the tokens it would get alone.

Only this lockstep schedule is the Generator's own: sampling (`Sampler` over
`sampling.process_logits` / `sample_tokens`), seeding (`sampling.seeded_generator`), logprobs
(`logprobs.token_logprobs`, `gather_logprobs`) and stop / holdback rules (`sequence.SequenceState`)
are the ones the slot-based `engine.StepEngine` (the server's) runs, so a seeded request gives the
same tokens through both. The lockstep schedule stays because unseeded sampling draws from torch's
global generator in Meta's order (one draw over the whole batch per step), which `Llama.generate`
reproduces after `torch.manual_seed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llama2.errors import GenerationError
from llama2.generation.decode import DecodeStep
from llama2.generation.logprobs import gather_logprobs, token_logprobs
from llama2.generation.sampling import Sampler, SamplingParams
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
    def _forward(self, tokens: Tensor, start_pos: int, last_only: bool) -> Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position only (skips the head elsewhere)."""
        model = self.model
        if self.decode_step is not None and tokens.shape[1] == 1 and last_only:
            positions = torch.full((tokens.shape[0],), start_pos, dtype=torch.long, device=tokens.device)
            return self.decode_step(tokens, positions)[:, None]  # (B, 1, V)
        if last_only and tokens.shape[1] > 1 and hasattr(model, "hidden_states"):
            h = model.hidden_states(tokens, start_pos)[:, -1:]  # (B, 1, dim)
            head: Tensor = model.output(h)  # (B, 1, V)
            return head.float()
        logits: Tensor = model(tokens, start_pos)  # (B, T, V)
        return logits.float()

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
        prompt_lp = want_lp and echo
        stop_ids = frozenset([self.tokenizer.eos_id, *stop_token_ids])

        lens = [len(p) for p in prompts]
        limits = [min(max_new_tokens, self.max_seq_len - n) for n in lens]
        total_len = max(n + k for n, k in zip(lens, limits, strict=True))
        min_len = min(lens)
        for i, p in enumerate(prompts):
            detok = self.detokenizer_factory(self.tokenizer)
            rows.append(
                SequenceState(i, p, limits[i], detok, stop, stop_ids, want_lp, top_logprobs > 0, echo)
            )

        model = self.model
        device = model.tok_embeddings.weight.device
        # Inference mode is entered per step, never across a `yield`: it is thread-local state and
        # must not leak into the consumer's code while the generator is suspended.
        with torch.inference_mode():
            buf = torch.zeros(bsz, total_len, dtype=torch.long, device=device)  # (B, total_len)
            for i, p in enumerate(prompts):
                buf[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
            prompt_mask = (
                torch.arange(total_len, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
            )  # (B, total_len)
            token_lp = torch.zeros(bsz, total_len, device=device) if prompt_lp else None  # (B, total_len)
            sampler = Sampler(plist, model.args.vocab_size, device, prompts)
            self._ensure_cache(bsz, total_len)
            if token_lp is not None and min_len == total_len:
                # Nothing to generate (every prompt fills the window): one forward for prompt logprobs.
                logits = self._forward(buf, 0, last_only=False)  # (B, T, V)
                token_lp[:, 1:] = gather_logprobs(logits[:, :-1], buf[:, 1:])  # (B, T-1)

        for r in rows:
            if r.limit == 0:
                yield r.finish_without_step()
        max_len = max(lens)
        prev = 0
        for cur in range(min_len, total_len):
            if all(r.done for r in rows) and (token_lp is None or cur > max_len - 1):
                break
            with torch.inference_mode():
                events = self._step(
                    buf, prev, cur, rows, lens, prompt_mask, sampler, token_lp, want_lp, top_logprobs
                )
            yield from events
            prev = cur

        if token_lp is not None:
            lp_rows = token_lp.tolist()
            for i, r in enumerate(rows):
                r.result.prompt_logprobs = lp_rows[i][: lens[i]]

    def _step(
        self,
        buf: Tensor,
        prev: int,
        cur: int,
        rows: list[SequenceState],
        lens: list[int],
        prompt_mask: Tensor,
        sampler: Sampler,
        token_lp: Tensor | None,
        want_lp: bool,
        top_logprobs: int,
    ) -> list[TokenEvent]:
        """Feed buf[:, prev:cur] (positions prev..cur-1), fill column `cur`, return the events."""
        logits = self._forward(buf[:, prev:cur], prev, last_only=token_lp is None)  # (B, T, V)
        last = logits[:, -1]  # (B, V)
        generating = [cur >= n and not r.done for n, r in zip(lens, rows, strict=True)]
        sampled = sampler.sample(last, generating)  # (B,)
        in_prompt = cur < max(lens)  # some row still reads its prompt: keep its prompt token
        next_tok = torch.where(prompt_mask[:, cur], buf[:, cur], sampled) if in_prompt else sampled
        buf[:, cur] = next_tok
        if sampler.tracks_history:
            sampler.update(next_tok, torch.tensor(generating, device=buf.device))
        if token_lp is not None:  # Meta's echo: logprob of every token in this chunk
            token_lp[:, prev + 1 : cur + 1] = gather_logprobs(logits, buf[:, prev + 1 : cur + 1])
        ids = next_tok.tolist()
        lps: list[float] | None = None
        tops: list[dict[int, float] | None] | None = None
        if want_lp:
            lps, tops = token_logprobs(last, next_tok, top_logprobs)
        return [
            r.accept(ids[i], lps[i] if lps else None, tops[i] if tops else None)
            for i, r in enumerate(rows)
            if generating[i]
        ]
