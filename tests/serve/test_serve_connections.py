"""Issue 9, the server's last edges: a long prompt is truncated exactly as its whole encoding would
be (without ever holding its millions of ids), and connections beyond `--max-connections` are
answered 503 and closed (raw sockets against uvicorn running our protocol in a thread).

The /health-latency test for a 4 MB prompt needs the real server and lives in
`test_serve_hardening.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
from serve_support import read_until_closed

from llama2.errors import ConfigError
from llama2.serve.http_errors import APIError
from llama2.serve.server import ServeConfig, add_arguments, bind_socket, config_from_args


def test_a_long_prompt_is_truncated_exactly_as_the_whole_encoding_would_be() -> None:
    from serve_support import TOKENIZER_MODEL

    from llama2.serve.prepare import AppSettings, RequestPreparer
    from llama2.serve.schemas import CompletionRequest
    from llama2.tokenizer import Tokenizer

    oracle = spm.SentencePieceProcessor(model_file=str(TOKENIZER_MODEL))
    tok = Tokenizer.from_file(TOKENIZER_MODEL)
    preparer = RequestPreparer(tok, tok.vocab_size, 256, AppSettings())
    text = " ".join(f"word{i} llama, naïve 🦙 {i * 7}." for i in range(30_000))  # ~1 MB: many pieces
    ids = oracle.encode(text)
    assert len(ids) > 100_000
    for max_tokens in (0, 1, 16, 254):
        body = CompletionRequest.model_validate({"prompt": text, "max_tokens": max_tokens, "truncate": True})
        prompt = preparer.prepare_completion(body).specs[0].prompt
        keep = 256 - max_tokens
        assert prompt == ([1, *ids[len(ids) - keep + 1 :]] if keep > 1 else ids[-1:]), max_tokens
    with pytest.raises(APIError) as refused:  # without truncate: the real length is reported
        preparer.prepare_completion(CompletionRequest.model_validate({"prompt": text, "max_tokens": 4}))
    assert f"you requested {len(ids) + 1 + 4} tokens ({len(ids) + 1} in the prompt" in refused.value.message
    short = "Hello world, " * 10
    body = CompletionRequest.model_validate({"prompt": short, "max_tokens": 4})
    assert preparer.prepare_completion(body).specs[0].prompt == [1, *oracle.encode(short)]


@contextmanager
def _tiny_server(max_connections: int) -> Iterator[tuple[str, int]]:
    """uvicorn with our protocol (a 30 s header deadline, `max_connections`) and a one-line app."""
    import uvicorn

    from llama2.serve.connection import header_timeout_protocol

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(
        app, http=header_timeout_protocol(30.0, max_connections), lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[0], sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _get(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data, _ = read_until_closed(sock, 5)
    return data


def test_connections_over_the_limit_get_503_and_are_closed() -> None:
    with _tiny_server(max_connections=2) as address:
        held = [socket.create_connection(address, timeout=5) for _ in range(2)]  # idle: they hold places
        try:
            time.sleep(0.2)  # accepted by the server
            with socket.create_connection(address, timeout=5) as third:
                data, elapsed = read_until_closed(third, 5)
            assert data.startswith(b"HTTP/1.1 503 "), data[:200]
            head, _, payload = data.partition(b"\r\n\r\n")
            assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
            err = json.loads(payload)["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "too_many_connections"
            assert "2 open connections" in err["message"]
            assert elapsed < 3  # closed after the grace period, not held
            held.pop().close()
            time.sleep(0.2)  # the server saw it go
            assert _get(address).startswith(b"HTTP/1.1 200 ")  # a place is free again
        finally:
            for s in held:
                s.close()
    with _tiny_server(max_connections=50) as address:  # under the limit, nothing is refused
        assert all(_get(address).startswith(b"HTTP/1.1 200 ") for _ in range(5))


def test_max_connections_option(tmp_path: Path) -> None:
    from llama2.serve.server import ensure_file_limit

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "--max-connections" in parser.format_help()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = config_from_args(parser.parse_args(["--model", str(ckpt)]))
    assert config.max_connections == ServeConfig().max_connections == 512
    config = config_from_args(parser.parse_args(["--model", str(ckpt), "--max-connections", "8"]))
    assert config.max_connections == 8
    with pytest.raises(ConfigError, match="max-connections must be at least 1"):
        config_from_args(parser.parse_args(["--model", str(ckpt), "--max-connections", "0"]))
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        with pytest.raises(ConfigError, match=r"needs \d+ open files.*ulimit -Hn"):
            ensure_file_limit(hard)
    ensure_file_limit(8)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= min(hard, 8 + 8 + 256)
