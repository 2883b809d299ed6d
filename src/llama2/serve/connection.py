"""Per-connection limits below the app: uvicorn's h11 protocol with a header deadline.

uvicorn bounds the size of a request head (`h11_max_incomplete_event_size`, answered with 400) and
the idle time between keep-alive requests (`timeout_keep_alive`), but not the time a client may take
to send its request line and headers: a client that sends one byte every few seconds, or nothing
at all after connecting, would hold its connection forever. `header_timeout_protocol` adds that
bound: a connection that has not delivered a complete request head within `header_timeout_s`
(counted from the connection, or from the first byte of a later keep-alive request) gets a 408 and
is closed. The body has its own deadline in `GuardMiddleware` (`read_timeout_s`).

It also bounds the number of open connections: a connection made while `max_connections` are
already open is answered at once with a 503 (OpenAI's error shape, `Retry-After: 1`) and closed
after a short grace period in which what the client sends is read and dropped (closing a socket with
unread data would reset it, and the client could lose the answer); at most `max_connections` refused
connections wait out their grace, more are closed at once. uvicorn's own `limit_concurrency`
is not used: it answers only once a request head is complete, so idle or slow connections beyond it
would still hold their sockets, and its 503 is plain text.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_LIMIT_BYTES = 16 * 1024  # request line + headers; larger heads get 400 from h11


SHED_GRACE_S = 1.0  # a refused connection's input is read and dropped this long before it is closed


def _error_response(status: str, message: str, type_: str, code: str, extra: str = "") -> bytes:
    error = {"message": message, "type": type_, "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n{extra}"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _timeout_response(seconds: float) -> bytes:
    message = f"the request line and headers did not arrive within {seconds:g} s"
    return _error_response("408 Request Timeout", message, "invalid_request_error", "request_timeout")


def _busy_response(limit: int) -> bytes:
    message = f"the server already has {limit} open connections (--max-connections); retry shortly"
    return _error_response(
        "503 Service Unavailable", message, "server_error", "too_many_connections", "retry-after: 1\r\n"
    )


class HeaderTimeoutH11Protocol(H11Protocol):
    """`H11Protocol` that closes a connection whose request head is not complete in time."""

    header_timeout_s: float = 30.0
    max_connections: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._shed = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # adds this connection to the server's set
        limit = self.max_connections
        if limit is not None and len(self.connections) > limit:
            self._shed = True
            transport.write(_busy_response(limit))
            if len(self.connections) > 2 * limit:  # a flood: no grace, at most `limit` sockets wait
                transport.close()
                return
            if transport.can_write_eof():
                transport.write_eof()
            self._header_timer = self.loop.call_later(SHED_GRACE_S, transport.close)
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._shed:
            return  # a refused connection: its input is dropped until it closes
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


def header_timeout_protocol(
    header_timeout_s: float, max_connections: int | None = None
) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class to pass to `uvicorn.Config(http=...)` (None: no connection limit)."""
    attrs = {"header_timeout_s": header_timeout_s, "max_connections": max_connections}
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), attrs)
