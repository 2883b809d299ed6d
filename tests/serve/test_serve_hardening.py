"""Issue 9, items 2 and 7: no request can freeze the server, and its edges are closed.

A real server process on 127.0.0.1 (API keys, a 1 s read timeout, a 4 MB body cap) is driven with
httpx and raw sockets:
- `/health` answers in < 100 ms while a 20k-pair `truncate` chat request (~1.5 MB) or a 4 MB
  `truncate` prompt is prepared;
- slow or silent clients are answered 408 and dropped after the read timeout (head and body);
- a foreign `Host` gets 421; the API key is checked before the body is read; `/docs`,
  `/redoc`, `/openapi.json` need the key;
- SIGTERM with a short drain timeout ends every live stream with an error event and `[DONE]`, a
  waiting non-streaming request with 503, and logs no traceback;
- `llama2 serve` on a port already in use prints one line and exits with status 1.

The last two start their own processes and are marked slow (`pytest -m slow`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_support import ServerProcess, read_until_closed, server_process, sse_events

from llama2.errors import ConfigError
from llama2.serve.http_errors import APIError
from llama2.serve.middleware import HostAllowList
from llama2.serve.prepare import PrepareWorkers
from llama2.serve.server import (
    API_KEY_ENV,
    ServeConfig,
    add_arguments,
    bind_socket,
    config_from_args,
    default_allowed_hosts,
)

KEY = "sk-hardening"
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT = 1.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with server_process(
        "--api-key", KEY,
        "--read-timeout", str(READ_TIMEOUT),
        "--max-body-bytes", str(4 * 1024 * 1024),
    ) as s:  # fmt: skip
        yield s


def _address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err  # type: ignore[no-any-return]


# ------------------------------------------------------------------------ item 2: no freeze
def _worst_case_truncate_body(pairs: int = 20_000) -> bytes:
    messages: list[dict[str, str]] = [{"role": "system", "content": "Answer briefly."}]
    for i in range(pairs):
        messages.append({"role": "user", "content": f"question {i}: what is the weather like today?"})
        messages.append({"role": "assistant", "content": f"answer {i}: sunny and warm"})
    messages.append({"role": "user", "content": "and tomorrow?"})
    return json.dumps({"messages": messages, "truncate": True, "max_tokens": 2, "temperature": 0}).encode()


def _health_stays_fast_while_posting(server: ServerProcess, path: str, body: bytes) -> httpx.Response:
    """POST `body` to `path` in a thread while polling `/health`; assert every poll sent during the
    request answered within 100 ms on top of the usual /health time, and return the (200) response."""
    result: dict[str, Any] = {}

    def big() -> None:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=120) as c:
            result["start"] = time.monotonic()
            result["response"] = c.post(path, content=body, headers={"Content-Type": "application/json"})
            result["end"] = time.monotonic()

    latencies: list[tuple[float, float]] = []  # (sent at, seconds)
    with httpx.Client(base_url=server.base_url, timeout=10) as health:
        baseline = []
        for _ in range(10):  # what /health costs on this machine right now, without the big request
            sent = time.monotonic()
            assert health.get("/health").status_code == 200
            baseline.append(time.monotonic() - sent)
        worker = threading.Thread(target=big)
        worker.start()
        while worker.is_alive():
            sent = time.monotonic()
            assert health.get("/health").status_code == 200
            latencies.append((sent, time.monotonic() - sent))
            time.sleep(0.01)
        worker.join()
    r: httpx.Response = result["response"]
    assert r.status_code == 200, r.text[:500]
    during = [lat for sent, lat in latencies if result["start"] + 0.05 < sent < result["end"] - 0.05]
    assert len(during) >= 3, (result["end"] - result["start"], latencies)
    # < 100 ms on an idle machine; on a shared, overloaded one every request is slower, so the bound
    # is 100 ms on top of the usual /health time (the quadratic search stalled it for 54 s).
    usual = sorted(baseline)[len(baseline) // 2]
    print(f"/health: usual {usual * 1000:.0f} ms, worst during the request {max(during) * 1000:.0f} ms")
    assert max(during) < 0.1 + usual, (usual, sorted(during)[-5:])
    return r


def test_health_stays_fast_during_a_worst_case_truncate(server: ServerProcess) -> None:
    body = _worst_case_truncate_body()
    assert 1_300_000 < len(body) < 4 * 1024 * 1024  # ~1.5 MB: under the body cap, as in issue 9
    r = _health_stays_fast_while_posting(server, "/v1/chat/completions", body)
    assert r.json()["usage"]["prompt_tokens"] <= 256 - 2  # truncated to the tiny model's context


def test_prepare_workers_are_bounded_in_threads_queue_and_time() -> None:
    workers = PrepareWorkers(workers=1, queue=2, timeout_s=0.3)
    release = threading.Event()
    threads: set[str] = set()

    def slow() -> str:
        threads.add(threading.current_thread().name)
        release.wait(5)
        return "done"

    async def run() -> tuple[list[Any], float]:
        first = asyncio.ensure_future(workers.run(slow))
        second = asyncio.ensure_future(workers.run(slow))
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as full:  # two admitted (one running, one waiting): a third is refused
            await workers.run(slow)
        assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
        start = time.monotonic()
        results = await asyncio.gather(first, second, return_exceptions=True)
        waited = time.monotonic() - start
        release.set()
        await asyncio.sleep(0.2)  # the abandoned work ends in its thread and frees its place
        results.append(await workers.run(lambda: "after"))
        return results, waited

    results, waited = asyncio.run(run())
    workers.shutdown()
    assert all(isinstance(r, APIError) and r.status == 503 and r.code == "timeout" for r in results[:2])
    assert waited < 1.0 and results[2] == "after"
    assert len(threads) == 1  # one worker thread


# ------------------------------------------------------------------- item 7: slow clients
def test_a_body_that_never_completes_gets_408(server: ServerProcess) -> None:
    host, port = _address(server)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ".encode()
        )
        data, elapsed = read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert b'"code":"request_timeout"' in data
    assert READ_TIMEOUT * 0.8 < elapsed < READ_TIMEOUT + 3


def test_a_slow_header_client_is_dropped(server: ServerProcess) -> None:
    host, port = _address(server)
    head = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: " + "a" * 200
    data = b""
    with socket.create_connection((host, port)) as sock:
        sock.settimeout(0.05)
        start = time.monotonic()
        for ch in head:  # one byte every 50 ms, never the blank line that ends the head
            sock.sendall(ch.encode())
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            break  # the server answered (or closed) before the head was complete
        closed_after = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert READ_TIMEOUT * 0.8 < closed_after < READ_TIMEOUT + 3


def test_a_silent_connection_is_dropped(server: ServerProcess) -> None:
    with socket.create_connection(_address(server)) as sock:
        data, elapsed = read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert READ_TIMEOUT * 0.8 < elapsed < READ_TIMEOUT + 3


def test_a_slow_second_request_on_a_kept_alive_connection_is_dropped(server: ServerProcess) -> None:
    host, port = _address(server)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        sock.settimeout(10)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        while first.count(b"HTTP/1.1") == 1 and b'"status":"ok"' not in first:  # the whole response
            first += sock.recv(65536)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: ")  # and nothing more
        data, elapsed = read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert elapsed < READ_TIMEOUT + 3


def test_an_oversized_head_gets_400(server: ServerProcess) -> None:
    """h11 refuses a request head that is still incomplete after 16 KiB (`HEADER_LIMIT_BYTES`)."""
    host, port = _address(server)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Big: {'b' * 20_000}".encode())
        data, elapsed = read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert elapsed < READ_TIMEOUT * 0.8  # refused for its size, not for the time it took


# --------------------------------------------------------------------------- item 7: hosts
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.2", "localhost.evil.example"])
def test_a_foreign_host_gets_421(server: ServerProcess, host: str) -> None:
    r = httpx.get(server.base_url + "/v1/models", headers={**AUTH, "Host": host})
    assert _error(r, 421)["code"] == "host_not_allowed"
    assert _error(httpx.get(server.base_url + "/health", headers={"Host": host}), 421)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "127.0.0.1:9", "[::1]:8000", "[::1]"])
def test_loopback_names_are_served(server: ServerProcess, host: str) -> None:
    assert httpx.get(server.base_url + "/health", headers={"Host": host}).status_code == 200


def test_a_request_without_host_gets_421(server: ServerProcess) -> None:
    with socket.create_connection(_address(server)) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        data, _ = read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 421 "), data[:100]


def test_host_allow_list_rules() -> None:
    loopback = ("localhost", "127.0.0.1", "[::1]")
    assert default_allowed_hosts("127.0.0.1") == default_allowed_hosts("::1") == loopback
    assert default_allowed_hosts("localhost") == default_allowed_hosts("127.8.9.1")
    assert default_allowed_hosts("0.0.0.0") == ("*",) and default_allowed_hosts("192.168.1.4") == ("*",)
    assert default_allowed_hosts("::") == ("*",)
    hosts = HostAllowList(["example.org", "::1"])
    assert hosts.allows("Example.org:443") and hosts.allows("example.org.") and hosts.allows("[::1]:1")
    assert not hosts.allows("example.org.evil") and not hosts.allows(None) and not hosts.allows("localhost")
    assert HostAllowList(["*"]).allows("anything") and HostAllowList([]).allows(None)


# ---------------------------------------------------------------------------- item 7: keys
def test_auth_comes_before_the_body(server: ServerProcess) -> None:
    url = server.base_url + "/v1/completions"
    json_ct = {"Content-Type": "application/json"}
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        r = httpx.post(url, content=b'{"prompt": "hi",', headers={**json_ct, **headers})
        assert _error(r, 401)["code"] == "invalid_api_key"  # not 400: the body is never parsed
        big = b'{"prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'
        assert _error(httpx.post(url, content=big, headers={**json_ct, **headers}), 401)
    r = httpx.post(url, content=b'{"prompt": "hi",', headers={**json_ct, **AUTH})
    assert _error(r, 400)["code"] == "invalid_json"  # with the key, the body is read


def test_docs_need_the_key(server: ServerProcess) -> None:
    for path in ("/docs", "/redoc", "/openapi.json", "/metrics", "/v1/models", "/no-such-path"):
        assert _error(httpx.get(server.base_url + path), 401)["code"] == "invalid_api_key", path
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.base_url + path, headers=AUTH).status_code == 200, path
    assert httpx.get(server.base_url + "/health").status_code == 200  # liveness stays open
    schema = httpx.get(server.base_url + "/openapi.json", headers=AUTH).json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "truncate" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "TextPart" in schema["components"]["schemas"]  # nested models are in the schema too


def test_keys_from_file_environment_and_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert API_KEY_ENV in " ".join(parser.format_help().split())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    keys = tmp_path / "keys"
    keys.write_text("sk-file\n", encoding="utf-8")
    monkeypatch.setenv(API_KEY_ENV, " sk-env-1 ,sk-env-2,, ")
    config = config_from_args(parser.parse_args(["--model", str(ckpt), "--api-key-file", str(keys)]))
    assert config.all_api_keys() == ("sk-env-1", "sk-env-2", "sk-file")
    assert "warning" not in capsys.readouterr().err
    monkeypatch.delenv(API_KEY_ENV)
    config = config_from_args(parser.parse_args(["--model", str(ckpt), "--api-key", "sk-cli"]))
    assert config.all_api_keys() == ("sk-cli",)
    assert "process list" in capsys.readouterr().err
    config = config_from_args(parser.parse_args(["--model", str(ckpt), "--allowed-hosts", "a.org, b.org"]))
    assert config.allowed_hosts == ("a.org", "b.org") and config.read_timeout_s == 30.0
    with pytest.raises(ConfigError, match="read-timeout"):
        config_from_args(parser.parse_args(["--model", str(ckpt), "--read-timeout", "0"]))
    assert ServeConfig().allowed_hosts is None  # resolved from --host when the server starts


# ------------------------------------------------------------------------- item 4: binding
def test_bind_errors_are_one_line_config_errors() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^cannot bind 127\.0\.0\.1:{port}: Address already in use$"):
            bind_socket("127.0.0.1", port)
    with pytest.raises(ConfigError, match=r"^cannot bind 192\.0\.2\.1:0: "):  # TEST-NET: not ours
        bind_socket("192.0.2.1", 0)
    with pytest.raises(ConfigError, match=r"^cannot bind no-such-host\.invalid:0: "):
        bind_socket("no-such-host.invalid", 0)


def test_accepted_connections_have_nagle_off() -> None:
    """asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets: without it, each reply on a kept-alive
    connection (and each SSE event) waited ~40 ms for the client's delayed ACK."""
    listener = bind_socket("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP

    async def run() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        value = await asyncio.wait_for(accepted, 10)
        writer.close()
        server.close()
        return value

    assert asyncio.run(run()) != 0


@pytest.mark.slow  # a fresh interpreter imports torch: 10-20 s on a busy machine
def test_cli_port_in_use_prints_one_line() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "llama2", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env={"LLAMA2_NO_KERNELS": "1", "PATH": "/usr/bin:/bin"},
        )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"llama2: error: cannot bind 127.0.0.1:{port}: Address already in use\n"


# --------------------------------------------------------------------------- item 7: drain
@pytest.mark.slow  # its own server process, which it stops
def test_streams_cut_by_the_drain_timeout_end_cleanly() -> None:
    with server_process("--drain-timeout", "1", "--step-delay", "0.05", "--max-slots", "4") as srv:
        streams: list[list[Any]] = [[] for _ in range(3)]
        plain: dict[str, httpx.Response] = {}
        first_events = threading.Barrier(4)

        def stream(i: int) -> None:
            body = {"prompt": f"long story {i}", "max_tokens": 200, "stream": True}
            with httpx.Client(base_url=srv.base_url, timeout=60) as c, c.stream(
                "POST", "/v1/completions", json=body
            ) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        streams[i].append(line)
                        break
                first_events.wait(30)
                streams[i].extend(lines)

        def waiting() -> None:
            body = {"prompt": "long answer", "max_tokens": 200}
            plain["r"] = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        threads.append(threading.Thread(target=waiting))
        for t in threads:
            t.start()
        first_events.wait(30)
        time.sleep(0.2)
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        code = srv.proc.wait(30)
    for lines in streams:
        events = list(sse_events(iter(lines)))
        assert events[-1] == "[DONE]", lines[-3:]
        err = events[-2]
        assert isinstance(err, dict) and err["error"]["code"] == "server_shutting_down", events[-2]
        assert err["error"]["type"] == "server_error" and "drain timeout" in err["error"]["message"]
    assert _error(plain["r"], 503)["code"] == "server_shutting_down"
    output = "".join(srv.output)
    assert "Traceback" not in output and "Exception" not in output, output
    assert "graceful shutdown exceeded" not in output, output  # the app cut them, not uvicorn
    assert code == 0


# ----------------------------------------------------------------- issue 9: a 4 MB prompt
def _four_mb_prompt_body() -> bytes:
    prefix, suffix = b'{"prompt": "', b'", "max_tokens": 2, "truncate": true, "temperature": 0}'
    room = 4 * 1024 * 1024 - len(prefix) - len(suffix) - 64
    return prefix + (b"llama " * (room // 6 + 1))[:room] + suffix


def test_health_stays_fast_during_a_4_mb_truncated_prompt(server: ServerProcess) -> None:
    """A 4 MB prompt is ~2.8 million ids: encoded in one SentencePiece call, building the id list held
    the GIL for over 100 ms, and so did freeing it; now it is encoded in 64 KiB pieces and only the
    tail that fits the context window is kept."""
    body = _four_mb_prompt_body()
    assert 4_000_000 < len(body) <= 4 * 1024 * 1024
    r = _health_stays_fast_while_posting(server, "/v1/completions", body)
    assert r.json()["usage"]["prompt_tokens"] == 256 - 2  # BOS + the last 253 ids: the whole window
