"""Server-sent events: the response class, the `data:` framing, and the marker that cuts a stream at
the end of the shutdown drain."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llama2.serve.scheduler import SequenceFailed

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any] | str) -> str:
    """One `data:` event (compact JSON for a dict)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


@dataclass(frozen=True)
class Drained(SequenceFailed):
    """Put in a request's queue when the shutdown drain timeout ends: its streams are closed with an
    error event and `[DONE]`, its non-streaming answer becomes a 503."""


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
