"""The FastAPI app: OpenAI-compatible endpoints over an `Engine`, API keys, errors and metrics.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `GET /health`,
`GET /metrics`. Every error body has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
The model and tokenizer are fixed when the app is built: no endpoint takes a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama2.chat import Message as ChatTurn
from llama2.chat import encode_dialog_with_info
from llama2.errors import Llama2Error
from llama2.generation.generator import TokenEvent
from llama2.generation.sampling import SamplingParams
from llama2.infill import encode_infill
from llama2.serve.metrics import ServeMetrics
from llama2.serve.scheduler import (
    Engine,
    EngineClosedError,
    EngineOverloadedError,
    InfillDetokenizer,
    PromptLogprobs,
    RequestHandle,
    SequenceDone,
    SequenceFailed,
    SequenceSpec,
)
from llama2.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from llama2.tokenizer import StreamingDetokenizer, Tokenizer

log = logging.getLogger("llama2.serve")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
KNOWN_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


@dataclass(frozen=True)
class AppSettings:
    """What the HTTP layer needs besides the engine.

    Attributes:
        model_name: the id served in `/v1/models` and echoed in responses.
        api_keys: accepted bearer keys; empty: no authentication.
        max_body_bytes: larger request bodies get 413.
        max_prompt_tokens: longer prompts get 400 (None: only the context window limits them).
        max_sequences_per_request: `n` times the number of prompts may not exceed this.
        chat_special_tags: what to do with `[INST]`, `<<SYS>>`... inside message contents: "reject"
            (400) or "sanitize" (replace with inert look-alikes).
        drain_timeout_s: on shutdown, how long live sequences may run before they are failed.
    """

    model_name: str = "llama2"
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None
    max_sequences_per_request: int = 16
    chat_special_tags: Literal["reject", "sanitize"] = "reject"
    drain_timeout_s: float = 30.0


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=err.headers
    )


# ---------------------------------------------------------------------------- ASGI middleware
class BodyLimitMetricsMiddleware:
    """Caps request bodies (413 after reading at most the cap, the rest is drained and dropped) and
    records request counts and latencies (to the last body byte, so streams count whole)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServeMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.requests.inc(endpoint=endpoint, code=str(status[0]))
                self.metrics.request_latency.observe(time.monotonic() - start)

        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body, too_large, disconnected = await self._read_body(scope, receive)
            if disconnected:
                return
            if too_large:
                err = APIError(
                    413,
                    f"request body is larger than the limit of {self.max_body_bytes} bytes",
                    code="request_too_large",
                )
                await _error_response(err)(scope, receive, send_wrapper)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self._guarded(scope, replay, send_wrapper)
            return
        await self._guarded(scope, receive, send_wrapper)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; an unexpected exception becomes a 500 in OpenAI's shape and is not re-raised
        (Starlette's outermost handler would re-raise it and uvicorn would drop the connection)."""
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                err = APIError(500, "internal server error", type="server_error", code="internal_error")
                await _error_response(err)(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, bool, bool]:
        """Returns (body, too_large, disconnected)."""
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                declared = value
        too_large = False
        if declared is not None:
            try:
                too_large = int(declared) > self.max_body_bytes
            except ValueError:
                too_large = False
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", False, True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                too_large = True
            if not too_large:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), too_large, False


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop (and close the generator, which cancels the request's
    sequences) as soon as the client disconnects."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def run_stream() -> None:
                with contextlib.suppress(OSError):  # the client went away mid-send
                    await self.stream_response(send)
                tg.cancel_scope.cancel()

            async def watch() -> None:
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()

            tg.start_soon(run_stream)
            tg.start_soon(watch)
        closer = getattr(self.body_iterator, "aclose", None)
        if closer is not None:
            await closer()


def _sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


# ---------------------------------------------------------------------------- token text
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


# ---------------------------------------------------------------------------- request context
@dataclass
class _Prepared:
    """Sequences of a request plus what the response needs to be built."""

    specs: list[SequenceSpec]
    prompt_tokens: int  # usage: each prompt counted once (not once per choice)
    n: int


class _Service:
    """Turns validated requests into engine sequences and engine items into OpenAI responses."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, settings: AppSettings) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.token_text = TokenText(tokenizer)
        self.created = int(time.time())
        self._key_digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in settings.api_keys]

    # --------------------------------------------------------------- auth
    def check_key(self, request: Request) -> None:
        if not self._key_digests:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401,
                "You didn't provide an API key. Send it as an 'Authorization: Bearer YOUR_KEY' header.",
                code="invalid_api_key",
            )
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        ok = False
        for digest in self._key_digests:  # every key is compared: time does not tell which matched
            ok |= hmac.compare_digest(given, digest)
        if not ok:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    # --------------------------------------------------------------- shared validation
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.settings.model_name}'",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )

    def sampling_params(self, body: CompletionRequest | ChatCompletionRequest, choice: int) -> SamplingParams:
        bias: dict[int, float] | None = None
        if body.logit_bias:
            bias = {}
            for key, value in body.logit_bias.items():
                try:
                    tok = int(key)
                except ValueError:
                    raise APIError(
                        400,
                        f"logit_bias keys must be token ids written as integers, got {key!r}",
                        param="logit_bias",
                    ) from None
                if not 0 <= tok < self.engine.vocab_size:
                    raise APIError(
                        400,
                        f"logit_bias token id {tok} is outside the vocabulary [0, {self.engine.vocab_size})",
                        param="logit_bias",
                    )
                bias[tok] = value
        seed = body.seed
        if seed is not None and choice > 0:
            seed = (seed + choice) % 2**64  # distinct, reproducible streams for the n choices
        try:
            return SamplingParams(
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=max(body.top_k, 0),
                min_p=body.min_p,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                seed=seed,
                logit_bias=bias,
            )
        except Llama2Error as e:
            raise APIError(400, str(e)) from e

    def check_counts(self, n: int, prompts: int) -> None:
        limit = self.settings.max_sequences_per_request
        if n * prompts > limit:
            raise APIError(
                400,
                f"n ({n}) times the number of prompts ({prompts}) is {n * prompts}; this server allows at "
                f"most {limit} sequences per request",
                param="n",
            )

    def fit(self, prompt: list[int], max_tokens: int, truncate: bool, param: str) -> list[int]:
        """Check (or, with `truncate`, shorten) a prompt against the caps and the context window."""
        ctx = self.engine.context_window
        cap = self.settings.max_prompt_tokens
        if max_tokens >= ctx:
            raise APIError(
                400,
                f"max_tokens ({max_tokens}) must be smaller than the context window of {ctx} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if len(prompt) + max_tokens > ctx:
            if not truncate:
                raise APIError(
                    400,
                    f"This model's maximum context length is {ctx} tokens. However, you requested "
                    f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the "
                    'completion). Shorten the prompt or max_tokens, or set "truncate": true.',
                    param=param,
                    code="context_length_exceeded",
                )
            keep = ctx - max_tokens
            bos = self.tokenizer.bos_id
            prompt = (
                prompt[:1] + prompt[len(prompt) - keep + 1 :]
                if prompt[0] == bos and keep > 1
                else prompt[-keep:]
            )
        if cap is not None and len(prompt) > cap:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; this server accepts at most {cap}",
                param=param,
                code="context_length_exceeded",
            )
        return prompt

    # --------------------------------------------------------------- completions
    def prepare_completion(self, body: CompletionRequest) -> _Prepared:
        self.check_model(body.model)
        tok = self.tokenizer
        raw = body.prompt
        prompts: list[str | list[int]]
        if isinstance(raw, str):
            prompts = [raw]
        elif raw and isinstance(raw[0], str):
            prompts = [p for p in raw if isinstance(p, str)]
        elif raw and isinstance(raw[0], int):
            prompts = [[t for t in raw if isinstance(t, int)]]
        else:
            prompts = [list(p) for p in raw if isinstance(p, list)]
        self.check_counts(body.n, len(prompts))
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(
                400, f"best_of must equal n ({body.n}) on this server, got {body.best_of}", param="best_of"
            )
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        stop_ids: tuple[int, ...] = ()
        infill = body.suffix is not None
        if infill:
            if body.echo:
                raise APIError(400, "echo cannot be combined with suffix (infilling)", param="echo")
            if tok.eot_id is None or tok.prefix_id is None:
                raise APIError(
                    400,
                    "suffix (infilling) needs a Code Llama model; this model's vocabulary has no "
                    "▁<PRE> ▁<SUF> ▁<MID> ▁<EOT> tokens",
                    param="suffix",
                )
            stop_ids = (tok.eot_id,)
        specs: list[SequenceSpec] = []
        total_prompt = 0
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            if isinstance(p, str):
                ids = (
                    encode_infill(p, body.suffix or "", tok) if infill else tok.encode(p, bos=True, eos=False)
                )
            else:
                if infill:
                    raise APIError(
                        400, "suffix (infilling) needs the prompt as text, not token ids", param="suffix"
                    )
                bad = next((t for t in p if t >= self.engine.vocab_size), None)
                if bad is not None:
                    raise APIError(
                        400,
                        f"token id {bad} is outside the vocabulary [0, {self.engine.vocab_size})",
                        param=param,
                    )
                ids = p
            ids = self.fit(ids, max_tokens, body.truncate, param)
            total_prompt += len(ids)
            for j in range(body.n):
                specs.append(
                    SequenceSpec(
                        prompt=ids,
                        max_tokens=max_tokens,
                        params=self.sampling_params(body, j),
                        stop=tuple(body.stop_list()),
                        stop_token_ids=stop_ids,
                        logprobs=body.logprobs,
                        echo=body.echo,
                        infill=infill,
                    )
                )
        return _Prepared(specs, total_prompt, body.n)

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

    def completion_response(self, prep: _Prepared, done: dict[int, SequenceDone]) -> Completion:
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
            model=self.settings.model_name,
            choices=choices,
            usage=Usage(
                prompt_tokens=prep.prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prep.prompt_tokens + completion_tokens,
            ),
        )

    # --------------------------------------------------------------- chat
    def prepare_chat(self, body: ChatCompletionRequest) -> _Prepared:
        self.check_model(body.model)
        self.check_counts(body.n, 1)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        dialog: list[ChatTurn] = []
        for m in body.messages:
            role: Literal["system", "user", "assistant"] = (
                "system"
                if m.role in ("system", "developer")
                else ("user" if m.role == "user" else "assistant")
            )
            dialog.append({"role": role, "content": m.text()})
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        ctx = self.engine.context_window
        if requested is not None and requested >= ctx:
            raise APIError(
                400,
                f"max_tokens ({requested}) must be smaller than the context window of {ctx} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        budget = ctx - (requested if requested is not None else 1) if body.truncate else None
        sanitize = self.settings.chat_special_tags == "sanitize"
        try:
            prompt = encode_dialog_with_info(dialog, self.tokenizer, budget, sanitize=sanitize).tokens
        except Llama2Error as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = requested if requested is not None else ctx - len(prompt)
        if max_tokens < 1 and requested is None:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens; the messages alone take {len(prompt)}",
                param="messages",
                code="context_length_exceeded",
            )
        prompt = self.fit(prompt, max_tokens, False, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        specs = [
            SequenceSpec(
                prompt=prompt,
                max_tokens=max_tokens,
                params=self.sampling_params(body, j),
                stop=tuple(body.stop_list()),
                logprobs=logprobs,
            )
            for j in range(body.n)
        ]
        return _Prepared(specs, len(prompt), body.n)

    def chat_token_logprob(self, token: int, logprob: float, top: dict[int, float] | None) -> TokenLogprob:
        text, raw = self.token_text.get(token)
        alts = [
            TopLogprob(token=self.token_text.text(t), logprob=v, bytes=list(self.token_text.get(t)[1]))
            for t, v in (top or {}).items()
        ]
        return TokenLogprob(token=text, logprob=logprob, bytes=list(raw), top_logprobs=alts)

    def chat_response(self, prep: _Prepared, done: dict[int, SequenceDone]) -> ChatCompletion:
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
            model=self.settings.model_name,
            choices=choices,
            usage=Usage(
                prompt_tokens=prep.prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prep.prompt_tokens + completion_tokens,
            ),
        )

    # --------------------------------------------------------------- engine bridge
    def submit(self, prep: _Prepared) -> RequestHandle:
        try:
            return self.engine.submit(prep.specs, asyncio.get_running_loop())
        except EngineOverloadedError as e:
            raise APIError(
                429, str(e), type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}
            ) from e
        except EngineClosedError as e:
            raise APIError(503, str(e), type="server_error", code="service_unavailable") from e
        except Llama2Error as e:
            raise APIError(400, str(e)) from e

    async def collect(self, handle: RequestHandle, request: Request) -> dict[int, SequenceDone]:
        """Wait for every sequence of the request, cancelling them if the client disconnects."""
        n = len(handle.specs)

        async def gather() -> dict[int, SequenceDone]:
            done: dict[int, SequenceDone] = {}
            while len(done) < n:
                item = await handle.queue.get()
                if isinstance(item, SequenceDone):
                    done[item.index] = item
                elif isinstance(item, SequenceFailed):
                    raise APIError(500, item.message, type="server_error", code="internal_error")
            return done

        task = asyncio.ensure_future(gather())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        finished = False
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                result = task.result()
                finished = True
                return result
            raise APIError(400, "the client disconnected", code="client_disconnected")
        finally:
            task.cancel()
            watcher.cancel()
            if not finished:
                handle.cancel()

    async def stream(
        self,
        handle: RequestHandle,
        prep: _Prepared,
        kind: Literal["completion", "chat"],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """SSE chunks for a request; the `finally` cancels the sequences when the client leaves."""
        rid = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        model = self.settings.model_name
        n = len(prep.specs)
        finished: set[int] = set()
        sampled = 0
        offsets = [0] * n
        started = [False] * n

        def chunk(choice: dict[str, Any]) -> str:
            data: dict[str, Any] = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }
            if include_usage:
                data["usage"] = None
            return _sse(data)

        def opening(i: int, prompt_lp: PromptLogprobs | None) -> str | None:
            """The first chunk of a choice: the role (chat) or the echoed prompt (completions)."""
            started[i] = True
            spec = prep.specs[i]
            if kind == "chat":
                return chunk(
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                )
            if not spec.echo:
                return None
            text = self.tokenizer.decode(spec.prompt)
            lp_obj = None
            if spec.logprobs is not None:
                lps = prompt_lp.logprobs if prompt_lp is not None else [0.0] * len(spec.prompt)
                ptops = prompt_lp.top_logprobs if prompt_lp is not None else None
                ptops = ptops or [None] * len(spec.prompt)
                lp_obj = self._stream_lp_completion(
                    spec.prompt, [None, *lps[1:]], [None, *ptops[1:]], spec.logprobs or 0, 0
                )
            offsets[i] = len(text)
            return chunk({"index": i, "text": text, "logprobs": lp_obj, "finish_reason": None})

        completed = False
        try:
            while len(finished) < n:
                item = await handle.queue.get()
                if isinstance(item, SequenceFailed):
                    err = error_body(item.message, "server_error", None, "internal_error")
                    yield _sse(err)
                    break
                i = item.index
                if isinstance(item, PromptLogprobs):
                    first = opening(i, item)
                    if first is not None:
                        yield first
                    continue
                if isinstance(item, SequenceDone):
                    finished.add(i)
                    sampled += item.sampled_tokens
                    continue
                if not started[i]:
                    first = opening(i, None)
                    if first is not None:
                        yield first
                out = self._stream_event(item, prep.specs[i], kind, offsets)
                if out is not None:
                    yield chunk(out)
            else:
                completed = True
                if include_usage:
                    usage = {
                        "prompt_tokens": prep.prompt_tokens,
                        "completion_tokens": sampled,
                        "total_tokens": prep.prompt_tokens + sampled,
                    }
                    yield _sse(
                        {
                            "id": rid,
                            "object": obj,
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage,
                        }
                    )
            yield "data: [DONE]\n\n"
        finally:
            if not completed:
                handle.cancel()

    def _stream_event(
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
                lp_obj = self._stream_lp_completion(
                    [ev.token_id], [ev.logprob], [ev.top_logprobs], spec.logprobs or 0, offsets[i]
                )
            offsets[i] += len(ev.text)
            return {"index": i, "text": ev.text, "logprobs": lp_obj, "finish_reason": ev.finish_reason}
        if want_lp and ev.token_id is not None and ev.logprob is not None:
            entry = self.chat_token_logprob(ev.token_id, ev.logprob, ev.top_logprobs)
            lp_obj = {"content": [entry.model_dump()]}
        delta: dict[str, Any] = {"content": ev.text} if ev.text or ev.finish_reason is None else {}
        return {"index": i, "delta": delta, "logprobs": lp_obj, "finish_reason": ev.finish_reason}

    def _stream_lp_completion(
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


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------------- the app
def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    settings: AppSettings | None = None,
    metrics: ServeMetrics | None = None,
) -> FastAPI:
    """Build the FastAPI app around a (not yet started) engine.

    The engine thread is started when the app starts and drained when it stops (uvicorn stops the
    app after the last connection closed, so SIGTERM finishes in-flight streams first).

    Args:
        engine: the continuous-batching engine (owns the model).
        tokenizer: the model's tokenizer.
        settings: HTTP-level limits, API keys and the model's name.
        metrics: where to record metrics (default: a new `ServeMetrics`, which should be the
            engine's own so that `/metrics` shows its state).

    Returns:
        The ASGI app.
    """
    settings = settings or AppSettings()
    metrics = metrics or engine.metrics or ServeMetrics()
    service = _Service(engine, tokenizer, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, settings.drain_timeout_s)

    app = FastAPI(
        title="llama2 OpenAI-compatible server",
        version="0.1.0",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            429: {"model": ErrorResponse},
            500: {"model": ErrorResponse},
        },
    )
    app.state.service = service
    app.state.metrics = metrics

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        message = f"{detail}" if exc.status_code != 400 else f"could not read the request body: {detail}"
        err = APIError(exc.status_code, message, type=kind, code=code, headers=getattr(exc, "headers", None))
        return _error_response(err)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error_response(
            APIError(500, "internal server error", type="server_error", code="internal_error")
        )

    auth = [Depends(service.check_key)]

    # ------------------------------------------------------------------ routes
    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        """Liveness: always 200 while the process serves."""
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics", tags=["server"], dependencies=auth, response_class=PlainTextResponse)
    async def metrics_endpoint() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=auth, response_model=ModelList)
    async def list_models() -> ModelList:
        """The one model this server serves."""
        card = ModelCard(id=settings.model_name, created=service.created, max_model_len=engine.context_window)
        return ModelList(data=[card])

    @app.post("/v1/completions", dependencies=auth, response_model=Completion)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion (and Code Llama infilling with `suffix`)."""
        prep = service.prepare_completion(body)
        handle = service.submit(prep)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStreamResponse(
                service.stream(handle, prep, "completion", include_usage), headers=_SSE_HEADERS
            )
        done = await service.collect(handle, request)
        return JSONResponse(service.completion_response(prep, done).model_dump(mode="json"))

    @app.post("/v1/chat/completions", dependencies=auth, response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion in the Llama 2-Chat format."""
        prep = service.prepare_chat(body)
        handle = service.submit(prep)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStreamResponse(
                service.stream(handle, prep, "chat", include_usage), headers=_SSE_HEADERS
            )
        done = await service.collect(handle, request)
        return JSONResponse(service.chat_response(prep, done).model_dump(mode="json"))

    app.add_middleware(BodyLimitMetricsMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    return app


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "tuple", "set"}
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _field_path(loc: Sequence[int | str]) -> str:
    """`("body", "prompt", "list[int]", 1)` -> `"prompt.1"`: drop "body" and pydantic's union-member tags."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif item != "body" and _FIELD_NAME.match(item) and item not in _TYPE_TAGS:
            parts.append(item)
    return ".".join(parts)


def validation_api_error(exc: RequestValidationError) -> APIError:
    """Map FastAPI's validation errors to a 400 that names the offending field."""
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return APIError(
            400,
            f"the request body is not valid JSON: {ctx.get('error', first.get('msg'))}",
            code="invalid_json",
        )
    parts: list[str] = []
    for err in errors:
        line = f"{_field_path(err.get('loc', ())) or 'body'}: {err.get('msg')}"
        if line not in parts:
            parts.append(line)
    more = f" (and {len(parts) - 5} more)" if len(parts) > 5 else ""
    return APIError(
        400,
        "invalid request: " + "; ".join(parts[:5]) + more,
        param=_field_path(first.get("loc", ())) or None,
        code="invalid_value",
    )
