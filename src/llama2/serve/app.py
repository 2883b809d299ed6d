"""The FastAPI app: `create_app` wires settings, middleware, error handlers, the lifespan and the routes.

Endpoints (one module each under `llama2.serve.routes`): `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`, `GET /health`, `GET /metrics`. Every error body has OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. The model and tokenizer are fixed when the app is
built: no endpoint takes a path. The request lifecycle and the shutdown drain are `service.Service`.

Nothing proportional to a request body runs on the event loop: `GuardMiddleware` (`middleware.py`)
checks the host and the API key and reads the body; parsing, validation, tokenization and chat
truncation (`prepare.py`) run on a small bounded thread pool; the loop only moves events.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama2.serve.async_engine import Engine
from llama2.serve.http_errors import APIError, error_body, error_response, validation_api_error
from llama2.serve.metrics import ServeMetrics
from llama2.serve.middleware import ApiKeys, GuardMiddleware, HostAllowList
from llama2.serve.prepare import AppSettings
from llama2.serve.responses import TokenText
from llama2.serve.routes import chat, completions, health, models
from llama2.serve.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse
from llama2.serve.service import Service
from llama2.tokenizer import Tokenizer

__all__ = ["APIError", "AppSettings", "TokenText", "begin_drain", "create_app", "error_body"]

log = logging.getLogger("llama2.serve")


_REQUEST_MODELS: tuple[type[BaseModel], ...] = (CompletionRequest, ChatCompletionRequest)


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
    if isinstance(service, Service):
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
    service = Service(engine, tokenizer, settings, metrics)

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
    for router in (health.router, models.router, completions.router, chat.router):
        app.include_router(router)

    app.add_middleware(
        GuardMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        read_timeout_s=settings.read_timeout_s,
        api_keys=ApiKeys(settings.api_keys),
        allowed_hosts=HostAllowList(settings.allowed_hosts),
    )
    return app
