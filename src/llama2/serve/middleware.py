"""The ASGI middleware in front of every route, in this order:

1. Host check: a `Host` header outside the allow-list gets 421 (DNS rebinding cannot reach a
   loopback server through a foreign name).
2. API key: with keys set, every path but `/health` (the API, `/metrics`, `/docs`, `/redoc`,
   `/openapi.json`) needs `Authorization: Bearer KEY`; the check happens before the body is read,
   so a key-less request gets 401 whatever its body (invalid JSON, over the size cap).
3. Body: read whole, at most `max_body_bytes` (413; the rest is drained and dropped) and within
   `read_timeout_s` of the first read (408, and the connection is closed).
4. Metrics and a last-resort 500 in OpenAI's shape for an unexpected exception.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama2.serve.http_errors import APIError, error_response
from llama2.serve.metrics import ServeMetrics

log = logging.getLogger("llama2.serve")

KNOWN_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
OPEN_PATHS = ("/health",)  # answered without an API key
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _host_name(value: str) -> str:
    """`"LocalHost:8000"` -> `"localhost"`, `"[::1]:80"` -> `"[::1]"`, `"::1"` -> `"[::1]"`."""
    value = value.strip().lower().rstrip(".")
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    if value.count(":") > 1:  # a bare IPv6 address (only in the allow-list, never valid in a header)
        return f"[{value}]"
    return value.partition(":")[0].rstrip(".")


class HostAllowList:
    """Which `Host` header values are served; `*` (or an empty list) allows any."""

    def __init__(self, hosts: Iterable[str]) -> None:
        names = [h.strip() for h in hosts if h.strip()]
        self.any = not names or "*" in names
        self.names = frozenset(_host_name(h) for h in names)

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        return header is not None and _host_name(header) in self.names


class ApiKeys:
    """Bearer-key check; the keys are kept as SHA-256 digests and all of them are compared."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> APIError | None:
        """None when the header carries an accepted key (or no key is configured), else the 401."""
        if not self._digests:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return APIError(
                401,
                "You didn't provide an API key. Send it as an 'Authorization: Bearer YOUR_KEY' header.",
                code="invalid_api_key",
            )
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        ok = False
        for digest in self._digests:  # every key is compared: time does not tell which matched
            ok |= hmac.compare_digest(given, digest)
        return None if ok else APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def _header(scope: Scope, name: bytes) -> str | None:
    value = None
    for key, raw in scope.get("headers", []):
        if key == name:
            value = raw.decode("latin-1")
    return value


class GuardMiddleware:
    """Host check, API keys, body cap and read timeout, metrics (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServeMetrics,
        max_body_bytes: int,
        read_timeout_s: float,
        api_keys: ApiKeys,
        allowed_hosts: HostAllowList,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.api_keys = api_keys
        self.allowed_hosts = allowed_hosts

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

        host = _header(scope, b"host")
        if not self.allowed_hosts.allows(host):
            err = APIError(
                421,
                f"this server does not answer to the host name {host!r}; pass it to --allowed-hosts "
                "to allow it",
                code="host_not_allowed",
                headers={"Connection": "close"},
            )
            await error_response(err)(scope, receive, send_wrapper)
            return
        if path not in OPEN_PATHS:
            denied = self.api_keys.check(_header(scope, b"authorization"))
            if denied is not None:
                await error_response(denied)(scope, receive, send_wrapper)
                return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    body, too_large, disconnected = await self._read_body(scope, receive)
            except TimeoutError:
                err = APIError(
                    408,
                    f"the request body did not arrive within {self.read_timeout_s:g} s",
                    code="request_timeout",
                    headers={"Connection": "close"},
                )
                await error_response(err)(scope, receive, send_wrapper)
                return
            if disconnected:
                return
            if too_large:
                err = APIError(
                    413,
                    f"request body is larger than the limit of {self.max_body_bytes} bytes",
                    code="request_too_large",
                )
                await error_response(err)(scope, receive, send_wrapper)
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
                await error_response(err)(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, bool, bool]:
        """Returns (body, too_large, disconnected)."""
        declared = _header(scope, b"content-length")
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
