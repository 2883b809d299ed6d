"""OpenAI response bodies from engine results: completions, chat completions, their logprobs and the
chunks of a stream."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from llama2.generation.engine import SequenceDone, SequenceSpec
from llama2.generation.sequence import InfillDetokenizer, TokenEvent
from llama2.serve.prepare import Prepared
from llama2.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from llama2.tokenizer import StreamingDetokenizer, Tokenizer


class TokenText:
    """Token id -> the text and bytes OpenAI's logprobs report (`▁` as a space, byte pieces as bytes)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        tok = self.tokenizer
        piece = tok.id_to_piece(token_id)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            raw = bytes([int(piece[3:5], 16)])
        elif tok.is_control(token_id):
            raw = b""
        else:
            raw = piece.replace("▁", " ").encode("utf-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        self._cache[token_id] = (text, raw)
        return text, raw

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


class ResponseBuilder:
    """Engine results -> OpenAI response objects (for one model name and tokenizer)."""

    def __init__(self, tokenizer: Tokenizer, model_name: str) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.token_text = TokenText(tokenizer)

    def completion_logprobs(self, spec: SequenceSpec, done: SequenceDone) -> CompletionLogprobs:
        res = done.result
        k = spec.logprobs or 0
        ids: list[int] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if spec.echo:
            ids += spec.prompt
            prompt_lp = res.prompt_logprobs or [0.0] * len(spec.prompt)
            lps += [None, *prompt_lp[1:]]
            ptops: list[dict[int, float] | None] = list(done.prompt_top_logprobs or [None] * len(spec.prompt))
            tops += [None] + [self._top_map(t) for t in ptops[1:]]
        ids += res.tokens
        gen_lps: list[float | None] = list(res.logprobs) if res.logprobs else [None] * len(res.tokens)
        lps += gen_lps
        gen_tops: list[dict[int, float] | None] = (
            list(res.top_logprobs) if res.top_logprobs else [None] * len(res.tokens)
        )
        tops += [self._top_map(t) for t in gen_tops]
        detok: InfillDetokenizer | StreamingDetokenizer = (
            InfillDetokenizer(self.tokenizer) if spec.infill else StreamingDetokenizer(self.tokenizer)
        )
        offsets: list[int] = []
        length = 0
        for t in ids:
            offsets.append(length)
            length += len(detok.add(t))
        return CompletionLogprobs(
            tokens=[self.token_text.text(t) for t in ids],
            token_logprobs=lps,
            top_logprobs=tops if k > 0 else None,
            text_offset=offsets,
        )

    def _top_map(self, top: dict[int, float] | None) -> dict[str, float] | None:
        if top is None:
            return None
        return {self.token_text.text(t): lp for t, lp in top.items()}

    def completion_response(self, prep: Prepared, done: dict[int, SequenceDone]) -> Completion:
        choices = []
        completion_tokens = 0
        for i, spec in enumerate(prep.specs):
            d = done[i]
            completion_tokens += d.sampled_tokens
            choices.append(
                CompletionChoice(
                    index=i,
                    text=d.result.text,
                    logprobs=self.completion_logprobs(spec, d) if spec.logprobs is not None else None,
                    finish_reason=d.result.finish_reason,
                )
            )
        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=choices,
            usage=Usage(
                prompt_tokens=prep.prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prep.prompt_tokens + completion_tokens,
            ),
        )

    # --------------------------------------------------------------- chat
    def chat_token_logprob(self, token: int, logprob: float, top: dict[int, float] | None) -> TokenLogprob:
        text, raw = self.token_text.get(token)
        alts = [
            TopLogprob(token=self.token_text.text(t), logprob=v, bytes=list(self.token_text.get(t)[1]))
            for t, v in (top or {}).items()
        ]
        return TokenLogprob(token=text, logprob=logprob, bytes=list(raw), top_logprobs=alts)

    def chat_response(self, prep: Prepared, done: dict[int, SequenceDone]) -> ChatCompletion:
        choices = []
        completion_tokens = 0
        for i, spec in enumerate(prep.specs):
            d = done[i]
            res = d.result
            completion_tokens += d.sampled_tokens
            logprobs = None
            if spec.logprobs is not None:
                lps = res.logprobs or []
                tops: list[dict[int, float] | None] = (
                    list(res.top_logprobs) if res.top_logprobs else [None] * len(lps)
                )
                logprobs = ChatLogprobs(
                    content=[
                        self.chat_token_logprob(t, lp, top)
                        for t, lp, top in zip(res.tokens, lps, tops, strict=False)
                    ]
                )
            choices.append(
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=res.text),
                    logprobs=logprobs,
                    finish_reason=res.finish_reason,
                )
            )
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=choices,
            usage=Usage(
                prompt_tokens=prep.prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prep.prompt_tokens + completion_tokens,
            ),
        )

    # --------------------------------------------------------------- engine bridge

    def stream_event(
        self, ev: TokenEvent, spec: SequenceSpec, kind: Literal["completion", "chat"], offsets: list[int]
    ) -> dict[str, Any] | None:
        i = ev.index
        stop_ids = {self.tokenizer.eos_id, *spec.stop_token_ids}
        counted = ev.token_id is not None and not (ev.finish_reason == "stop" and ev.token_id in stop_ids)
        want_lp = spec.logprobs is not None and counted and ev.logprob is not None
        if not ev.text and ev.finish_reason is None and not want_lp:
            return None
        lp_obj: dict[str, Any] | None = None
        if kind == "completion":
            if want_lp and ev.token_id is not None:
                lp_obj = self.stream_lp_completion(
                    [ev.token_id], [ev.logprob], [ev.top_logprobs], spec.logprobs or 0, offsets[i]
                )
            offsets[i] += len(ev.text)
            return {"index": i, "text": ev.text, "logprobs": lp_obj, "finish_reason": ev.finish_reason}
        if want_lp and ev.token_id is not None and ev.logprob is not None:
            entry = self.chat_token_logprob(ev.token_id, ev.logprob, ev.top_logprobs)
            lp_obj = {"content": [entry.model_dump()]}
        delta: dict[str, Any] = {"content": ev.text} if ev.text or ev.finish_reason is None else {}
        return {"index": i, "delta": delta, "logprobs": lp_obj, "finish_reason": ev.finish_reason}

    def stream_lp_completion(
        self,
        ids: list[int],
        lps: list[float | None],
        tops: list[dict[int, float] | None],
        k: int,
        offset: int,
    ) -> dict[str, Any]:
        return {
            "tokens": [self.token_text.text(t) for t in ids],
            "token_logprobs": lps,
            "top_logprobs": [self._top_map(t) for t in tops] if k > 0 else None,
            "text_offset": [offset] * len(ids),
        }
