"""The request lifecycle shared by the OpenAI routes: prepare off the loop, submit to the engine,
collect or stream the results, and track live requests for the shutdown drain.

One `Service` lives on `app.state.service` for the app's lifetime; the route modules
(`llama2.serve.routes`) reach it with `service_of(request)`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request

from llama2.errors import Llama2Error
from llama2.generation.engine import PromptLogprobs, SequenceDone, SequenceFailed
from llama2.serve.async_engine import Engine, EngineClosedError, EngineOverloadedError, RequestHandle
from llama2.serve.http_errors import APIError, error_body, parse_body
from llama2.serve.metrics import ServeMetrics
from llama2.serve.prepare import AppSettings, Prepared, PrepareWorkers, RequestPreparer
from llama2.serve.responses import ResponseBuilder
from llama2.serve.schemas import ChatCompletionRequest, CompletionRequest
from llama2.serve.sse import DONE, Drained, sse
from llama2.tokenizer import Tokenizer

__all__ = ["Service", "service_of"]


class Service:
    """Turns engine items into OpenAI responses; tracks live requests for the shutdown drain."""

    def __init__(
        self, engine: Engine, tokenizer: Tokenizer, settings: AppSettings, metrics: ServeMetrics
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
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

    # --------------------------------------------------------------- one request
    def submit(self, prep: Prepared) -> RequestHandle:
        """Hand the prepared sequences to the engine; engine refusals become OpenAI errors."""
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
        watcher = asyncio.ensure_future(wait_disconnect(request))
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


async def wait_disconnect(request: Request) -> None:
    """Return once the client has disconnected (the body was already read by the middleware)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def service_of(request: Request) -> Service:
    """The `Service` of the app serving `request` (set by `create_app`)."""
    service = getattr(request.app.state, "service", None)
    if not isinstance(service, Service):
        raise RuntimeError("the app has no llama2 Service; build it with llama2.serve.app.create_app")
    return service
