"""Prefill + decode loop over the model's KV cache, written as a Python generator of token events.

Batching follows Meta's reference: prompts are right-padded into one (B, total_len) buffer, the
first forward covers the shortest prompt, and each later step feeds one column; a row still inside
its prompt keeps its prompt token instead of the sample. No padding ever enters the model, so every
row gets the tokens it would get alone.

The loop is split into small pieces (`_forward`, `Sampler.sample`, `_RowState.accept`) so that
speculative decoding (verify k drafted tokens in one forward at explicit positions) and continuous
batching (per-row `start_pos` tensors and cache `slots`, which the model already supports) can be
added beside `stream` without touching the sampling or stop rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from llama2.errors import GenerationError
from llama2.generation.decode import DecodeStep
from llama2.generation.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from llama2.model import Transformer

FinishReason = Literal["stop", "length"]

# With a compiled decode step the KV cache length is rounded up to a multiple of this, so that
# generations of similar lengths reuse one cache (and one compiled graph).
CACHE_ROUND = 256


class TokenizerLike(Protocol):
    """What the generator needs from a tokenizer (`llama2.tokenizer.Tokenizer` provides it)."""

    @property
    def eos_id(self) -> int: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class Detokenizer(Protocol):
    """Incremental decoding: `add` returns newly completed text, `flush` the rest."""

    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


def _default_detokenizer(tokenizer: TokenizerLike) -> Detokenizer:
    from llama2.tokenizer import StreamingDetokenizer

    detok: Detokenizer = StreamingDetokenizer(tokenizer)
    return detok


@dataclass(frozen=True)
class TokenEvent:
    """One step of one sequence, as yielded by `Generator.stream`.

    Attributes:
        index: the sequence's row in the request.
        token_id: the token sampled at this step. When `finish_reason` is "stop" because of EOS or a
            stop token id, this is that token (it is not part of the result's tokens or text); None
            when a sequence finishes without a step (no room left in the context window).
        text: newly completed text (text that might start a stop string is held back until decided).
        logprob: log-softmax of the raw model logits at the chosen token (None unless requested).
        top_logprobs: the `top_logprobs` most likely tokens and their logprobs (None unless requested).
        finish_reason: "stop" (EOS, stop token id or stop string), "length", or None while running.
    """

    index: int
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: FinishReason | None = None


@dataclass
class GenerationResult:
    """The outcome of one prompt.

    Attributes:
        prompt_tokens: the prompt.
        tokens: generated tokens, without the EOS / stop token that ended generation (a stop string's
            last token is kept; only the text is cut).
        text: generated text, cut before the first stop string. With `echo`, the prompt's text is
            included in front (decoded together with the generation, as Meta's echo).
        finish_reason: "stop" or "length".
        logprobs: per generated token, log-softmax of the raw model distribution (before penalties,
            temperature and filters) at the chosen token; None unless requested.
        top_logprobs: per generated token, the most likely alternatives {token id: logprob}.
        prompt_logprobs: with `echo` and `logprobs`: per prompt token, its logprob given the tokens
            before it (the first token has none and gets 0.0, as in Meta's reference).
    """

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = "length"
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float] | None = None


class _RowState:
    """Stop rules, detokenization and accumulated output of one sequence."""

    def __init__(
        self,
        index: int,
        prompt: list[int],
        limit: int,
        detok: Detokenizer,
        stop: Sequence[str],
        stop_ids: frozenset[int],
        want_logprobs: bool,
        want_top: bool,
        echo: bool,
    ) -> None:
        self.index = index
        self.limit = limit
        self.detok = detok
        self.stop = [s for s in stop if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.stop_ids = stop_ids
        self.result = GenerationResult(
            prompt_tokens=prompt,
            logprobs=[] if want_logprobs else None,
            top_logprobs=[] if want_top else None,
        )
        self.text = ""  # everything decoded so far (with echo: the prompt text first)
        self.gen_start = 0  # where generated text starts in self.text (stop strings only search there)
        if echo:
            self.text = "".join(detok.add(t) for t in prompt)
            self.gen_start = len(self.text)
        self.emitted = self.gen_start
        self.done = False

    def finish_without_step(self) -> TokenEvent:
        self.text += self.detok.flush()
        self.done = True
        return self._event(None, None, None, "length")

    def accept(self, token: int, logprob: float | None, top: dict[int, float] | None) -> TokenEvent:
        """Take the token sampled for this row and return the event to yield."""
        res = self.result
        if token in self.stop_ids:
            self.text += self.detok.flush()
            self._cut_at_stop(self.gen_start)
            self.done = True
            return self._event(token, logprob, top, "stop")
        res.tokens.append(token)
        if res.logprobs is not None and logprob is not None:
            res.logprobs.append(logprob)
        if res.top_logprobs is not None and top is not None:
            res.top_logprobs.append(top)
        before = len(self.text)
        self.text += self.detok.add(token)
        reason: FinishReason | None = None
        if self._cut_at_stop(max(self.gen_start, before - self.max_stop + 1)):
            reason = "stop"
        elif len(res.tokens) >= self.limit:
            before = len(self.text)
            self.text += self.detok.flush()
            reason = (
                "stop" if self._cut_at_stop(max(self.gen_start, before - self.max_stop + 1)) else "length"
            )
        self.done = reason is not None
        return self._event(token, logprob, top, reason)

    def _cut_at_stop(self, search_from: int) -> bool:
        """Cut `self.text` before the earliest stop string found at or after `search_from`."""
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _holdback(self) -> int:
        """Length of the longest tail of the generated text that could still begin a stop string."""
        tail = self.text[max(self.gen_start, len(self.text) - self.max_stop + 1) :]
        for n in range(len(tail), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0

    def _event(
        self,
        token: int | None,
        logprob: float | None,
        top: dict[int, float] | None,
        reason: FinishReason | None,
    ) -> TokenEvent:
        end = len(self.text) if reason is not None else len(self.text) - self._holdback()
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        if reason is not None:
            self.result.finish_reason = reason
            self.result.text = self.text
        return TokenEvent(self.index, token, delta, logprob, top, reason)


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
        rows: list[_RowState] = []
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
        rows: list[_RowState],
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
            rows.append(_RowState(i, p, limits[i], detok, stop, stop_ids, want_lp, top_logprobs > 0, echo))

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
                token_lp[:, 1:] = -F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), buf[:, 1:], reduction="none"
                )

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
        rows: list[_RowState],
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
            token_lp[:, prev + 1 : cur + 1] = -F.cross_entropy(
                logits.transpose(1, 2), buf[:, prev + 1 : cur + 1], reduction="none"
            )
        ids = next_tok.tolist()
        lps: list[float] | None = None
        tops: list[dict[int, float]] | None = None
        if want_lp:
            lsm = torch.log_softmax(last, dim=-1)  # (B, V)
            lps = lsm.gather(-1, next_tok[:, None]).squeeze(-1).tolist()
            if top_logprobs > 0:
                vals, idx = torch.topk(lsm, top_logprobs, dim=-1)  # (B, k) each
                tops = [
                    dict(zip(ix, vs, strict=True)) for ix, vs in zip(idx.tolist(), vals.tolist(), strict=True)
                ]
        return [
            r.accept(ids[i], lps[i] if lps else None, tops[i] if tops else None)
            for i, r in enumerate(rows)
            if generating[i]
        ]
