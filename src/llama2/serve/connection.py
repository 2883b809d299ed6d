"""Per-connection limits below the app: uvicorn's h11 protocol with a header deadline.

uvicorn bounds the size of a request head (`h11_max_incomplete_event_size`, answered with 400) and
the idle time between keep-alive requests (`timeout_keep_alive`), but not the time a client may take
to send its request line and headers: a client that sends one byte every few seconds, or nothing
at all after connecting, would hold its connection forever. `header_timeout_protocol` adds that
bound: a connection that has not delivered a complete request head within `header_timeout_s`
(counted from the connection, or from the first byte of a later keep-alive request) gets a 408 and
is closed. The body has its own deadline in `GuardMiddleware` (`read_timeout_s`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_LIMIT_BYTES = 16 * 1024  # request line + headers; larger heads get 400 from h11


def _timeout_response(seconds: float) -> bytes:
    message = f"the request line and headers did not arrive within {seconds:g} s"
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": "request_timeout"}
    body = json.dumps({"error": error}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class HeaderTimeoutH11Protocol(H11Protocol):
    """`H11Protocol` that closes a connection whose request head is not complete in time."""

    header_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():
            self._arm()  # a new request started (or the first is still incomplete): keep its deadline
        else:
            self._disarm()

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if not self._waiting_for_head():
            return
        if self.conn.our_state is h11.IDLE:  # nothing of ours is in flight: answer before closing
            self.transport.write(_timeout_response(self.header_timeout_s))
        self.transport.close()


def header_timeout_protocol(header_timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class to pass to `uvicorn.Config(http=...)`."""
    return type(
        "HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": header_timeout_s}
    )
