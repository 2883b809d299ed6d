"""One sequence's stop rules, stream holdback and accumulated output (`SequenceState`), and the
event and result types every generation caller shares.

A stop string is searched only in generated text; text that could still begin a stop string is
held back from `TokenEvent.text` until decided, so a streamed text never shows part of a stop
string. EOS and stop token ids end a sequence without entering its tokens or text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


class TokenizerLike(Protocol):
    """What the generator needs from a tokenizer (`llama2.tokenizer.Tokenizer` provides it)."""

    @property
    def eos_id(self) -> int: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class Detokenizer(Protocol):
    """Incremental decoding: `add` returns newly completed text, `flush` the rest."""

    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class InfillTokenizer(Protocol):
    """What `InfillDetokenizer` needs (`llama2.tokenizer.Tokenizer` provides it)."""

    def decode_infilling(self, ids: Sequence[int]) -> str: ...


class InfillDetokenizer:
    """Streaming detokenizer for a Code Llama middle: like `decode_infilling`, keeps a leading space.

    Re-decodes the ids seen so far on each step (a middle is short) and emits the new complete text.
    """

    def __init__(self, tokenizer: InfillTokenizer) -> None:
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


class SequenceState:
    """Stop rules, stream holdback, detokenization and accumulated output of one sequence.

    The one place these rules live: `Generator`, the server's engine and RL rollouts feed each
    sampled token to `accept` and forward the `TokenEvent` it returns.

    Example:
        >>> state = SequenceState(0, prompt, limit=16, detok=StreamingDetokenizer(tok), stop=["\\n"],
        ...                       stop_ids=frozenset([tok.eos_id]), want_logprobs=False,
        ...                       want_top=False, echo=False)
        >>> event = state.accept(token, None, None)   # event.text: text safe to show now
    """

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
