"""The FastAPI app: OpenAI-compatible endpoints over an `Engine`, errors, metrics and the shutdown drain.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `GET /health`,
`GET /metrics`. Every error body has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
The model and tokenizer are fixed when the app is built: no endpoint takes a path.

Nothing proportional to a request body runs on the event loop: `GuardMiddleware` (`middleware.py`)
checks the host and the API key and reads the body; parsing, validation, tokenization and chat
truncation (`prepare.py`) run on a small bounded thread pool; the loop only moves events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama2.errors import Llama2Error
from llama2.generation.engine import PromptLogprobs, SequenceDone, SequenceFailed
from llama2.serve.async_engine import Engine, EngineClosedError, EngineOverloadedError, RequestHandle
from llama2.serve.http_errors import APIError, error_body, error_response, parse_body, validation_api_error
from llama2.serve.metrics import ServeMetrics
from llama2.serve.middleware import ApiKeys, GuardMiddleware, HostAllowList
from llama2.serve.prepare import AppSettings, Prepared, PrepareWorkers, RequestPreparer
from llama2.serve.responses import ResponseBuilder, TokenText
from llama2.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from llama2.serve.sse import DONE, SSE_HEADERS, Drained, EventStreamResponse, sse
from llama2.tokenizer import Tokenizer

__all__ = ["APIError", "AppSettings", "TokenText", "begin_drain", "create_app", "error_body"]

log = logging.getLogger("llama2.serve")


class _Service:
    """Turns engine items into OpenAI responses; tracks live requests for the shutdown drain."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, settings: AppSettings) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.responses = ResponseBuilder(tokenizer, settings.model_name)
        self.created = int(time.time())
        self.preparer = RequestPreparer(tokenizer, engine.vocab_size, engine.context_window, settings)
        self.workers = PrepareWorkers(
            settings.prepare_workers, settings.prepare_queue, settings.prepare_timeout_s
        )
        self.live: set[RequestHandle] = set()
        self.draining = False
        self.cut = False  # the drain timeout passed: new requests get 503

    async def prepare(
        self, request: Request, model: type[CompletionRequest] | type[ChatCompletionRequest]
    ) -> tuple[CompletionRequest | ChatCompletionRequest, Prepared]:
        """Parse, validate and prepare the request's body on a worker thread."""
        raw = await request.body()  # already read (and capped) by GuardMiddleware
        content_type = request.headers.get("content-type")

        def work() -> tuple[CompletionRequest | ChatCompletionRequest, Prepared]:
            body = parse_body(model, raw, content_type)
            if isinstance(body, ChatCompletionRequest):
                return body, self.preparer.prepare_chat(body)
            return body, self.preparer.prepare_completion(body)

        return await self.workers.run(work)

    # --------------------------------------------------------------- shutdown drain
    def begin_drain(self) -> None:
        """Shutdown started: in `drain_timeout_s`, cut whatever is still running (idempotent)."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(self.settings.drain_timeout_s, self.cut_live)

    def cut_live(self) -> None:
        """End every live request now: streams get an error event and `[DONE]`, others a 503."""
        message = (
            f"the server is shutting down and the drain timeout of {self.settings.drain_timeout_s:g} s "
            "has passed; the request was cut"
        )
        self.cut = True
        for handle in list(self.live):
            handle.queue.put_nowait(Drained(index=-1, message=message))
        self.live.clear()

    def submit(self, prep: Prepared) -> RequestHandle:
        if self.cut:
            message = "the server is shutting down"
            raise APIError(503, message, type="server_error", code="service_unavailable")
        try:
            handle = self.engine.submit(prep.specs, asyncio.get_running_loop())
        except EngineOverloadedError as e:
            raise APIError(
                429, str(e), type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}
            ) from e
        except EngineClosedError as e:
            raise APIError(503, str(e), type="server_error", code="service_unavailable") from e
        except Llama2Error as e:
            raise APIError(400, str(e)) from e
        self.live.add(handle)
        return handle

    async def collect(self, handle: RequestHandle, request: Request) -> dict[int, SequenceDone]:
        """Wait for every sequence of the request, cancelling them if the client disconnects."""
        n = len(handle.specs)

        async def gather() -> dict[int, SequenceDone]:
            done: dict[int, SequenceDone] = {}
            while len(done) < n:
                item = await handle.queue.get()
                if isinstance(item, SequenceDone):
                    done[item.index] = item
                elif isinstance(item, Drained):
                    raise APIError(503, item.message, type="server_error", code="server_shutting_down")
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
            self.live.discard(handle)
            if not finished:
                handle.cancel()

    async def stream(
        self,
        handle: RequestHandle,
        prep: Prepared,
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
            return sse(data)

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
                lp_obj = self.responses.stream_lp_completion(
                    spec.prompt, [None, *lps[1:]], [None, *ptops[1:]], spec.logprobs or 0, 0
                )
            offsets[i] = len(text)
            return chunk({"index": i, "text": text, "logprobs": lp_obj, "finish_reason": None})

        completed = False
        try:
            while len(finished) < n:
                item = await handle.queue.get()
                if isinstance(item, SequenceFailed):
                    code = "server_shutting_down" if isinstance(item, Drained) else "internal_error"
                    yield sse(error_body(item.message, "server_error", None, code))
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
                out = self.responses.stream_event(item, prep.specs[i], kind, offsets)
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
                    yield sse(
                        {
                            "id": rid,
                            "object": obj,
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage,
                        }
                    )
            yield DONE
        finally:
            self.live.discard(handle)
            if not completed:
                handle.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------------- the app
_REQUEST_MODELS: tuple[type[BaseModel], ...] = (CompletionRequest, ChatCompletionRequest)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself (off the event loop)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi_with_request_models(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI schema with the request models, which no route declares as a parameter."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _, defs = models_json_schema(
                [(m, "validation") for m in _REQUEST_MODELS], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def begin_drain(app: FastAPI) -> None:
    """Tell an app built by `create_app` that shutdown began (the server calls it; idempotent)."""
    service = getattr(app.state, "service", None)
    if isinstance(service, _Service):
        service.begin_drain()


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    settings: AppSettings | None = None,
    metrics: ServeMetrics | None = None,
) -> FastAPI:
    """Build the FastAPI app around a (not yet started) engine.

    The engine thread is started when the app starts and drained when it stops. The server calls
    `begin_drain` when shutdown starts: after `settings.drain_timeout_s` every request still running
    is cut (streams end with an error event and `[DONE]`), then the app's shutdown stops the engine.

    Args:
        engine: the continuous-batching engine (owns the model).
        tokenizer: the model's tokenizer.
        settings: HTTP-level limits, API keys, allowed hosts and the model's name.
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
        service.workers.shutdown()
        await asyncio.to_thread(engine.shutdown, settings.drain_timeout_s)

    app = FastAPI(
        title="llama2 OpenAI-compatible server",
        version="0.1.0",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            408: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            421: {"model": ErrorResponse},
            429: {"model": ErrorResponse},
            500: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
        },
    )
    app.openapi = _openapi_with_request_models(app)  # type: ignore[method-assign]
    app.state.service = service
    app.state.metrics = metrics

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_api_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        message = f"{detail}" if exc.status_code != 400 else f"could not read the request body: {detail}"
        err = APIError(exc.status_code, message, type=kind, code=code, headers=getattr(exc, "headers", None))
        return error_response(err)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        err = APIError(500, "internal server error", type="server_error", code="internal_error")
        return error_response(err)

    # ------------------------------------------------------------------ routes
    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        """Liveness: always 200 while the process serves (no API key needed)."""
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics", tags=["server"], response_class=PlainTextResponse)
    async def metrics_endpoint() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The one model this server serves."""
        card = ModelCard(id=settings.model_name, created=service.created, max_model_len=engine.context_window)
        return ModelList(data=[card])

    @app.post("/v1/completions", response_model=Completion, openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        """Text completion (and Code Llama infilling with `suffix`)."""
        body, prep = await service.prepare(request, CompletionRequest)
        handle = service.submit(prep)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStreamResponse(
                service.stream(handle, prep, "completion", include_usage), headers=SSE_HEADERS
            )
        done = await service.collect(handle, request)
        return JSONResponse(service.responses.completion_response(prep, done).model_dump(mode="json"))

    @app.post(
        "/v1/chat/completions", response_model=ChatCompletion, openapi_extra=_json_body(ChatCompletionRequest)
    )
    async def chat_completions(request: Request) -> Response:
        """Chat completion in the Llama 2-Chat format."""
        body, prep = await service.prepare(request, ChatCompletionRequest)
        handle = service.submit(prep)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = service.stream(handle, prep, "chat", include_usage)
            return EventStreamResponse(stream, headers=SSE_HEADERS)
        done = await service.collect(handle, request)
        return JSONResponse(service.responses.chat_response(prep, done).model_dump(mode="json"))

    app.add_middleware(
        GuardMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        read_timeout_s=settings.read_timeout_s,
        api_keys=ApiKeys(settings.api_keys),
        allowed_hosts=HostAllowList(settings.allowed_hosts),
    )
    return app
