"""Server fault cases that need the real `llama2 serve` command line (run by serve_faults.py):

  truncate     /health latency while the worst-case `"truncate": true` requests are served
               (20,000 message pairs, ~1.5 MB; a ~4 MB prompt; one ~4 MB chat message).
  slow-clients N (default 1,000) loopback connections that trickle their headers or body one byte
               a second for a bounded time, against a server with `--read-timeout 3` and
               `--max-connections 512`, while /health and a small completion are timed: the server
               must answer each one 408 (read timeout) or 503 (over the limit) and close it in time,
               and its open descriptors must stay bounded and fall back.
  drain        streaming requests in flight, SIGTERM with `--drain-timeout`: how the streams end
               (a terminator or a cut connection), when, and how (and how fast) the server exits.
  auth-host    with `--api-key`: a wrong Host header, invalid JSON / an oversized body without a key,
               /docs, /openapi.json and /v1/models without a key; controls with the right key.

Each part starts its own server (`python -m llama2 serve --port 0`, loopback) and stops it; every
part is bounded in connections and time and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

import fuzz_support as fs
from fuzz_requests import health_during, still_answers, worst_truncate_bodies


def truncate_part(src: Path | None, model: str, goal_ms: float = 100.0) -> dict[str, Any]:
    server = fs.start_cli_server(src, ["--model", model, "--log-level", "warning"])
    out: dict[str, Any] = {}
    try:
        for name, (path, body) in worst_truncate_bodies().items():
            out[name] = asyncio.run(health_during(server.url, path, body, timeout=120))
        out["alive_after"] = still_answers(server.url)
    finally:
        out["server_exit_code"], _ = server.stop()
    checks: dict[str, bool] = {}
    for n in worst_truncate_bodies():
        h = out[n]
        fast = h["health_max_ms"] < goal_ms and not h["health_errors"]
        checks[f"health_max_under_{goal_ms:g}ms[{n}]"] = fast
        ok_status = isinstance(h["status"], int) and h["status"] < 500
        checks[f"answered_ok_or_shaped_4xx[{n}]"] = bool(h["error_shape_ok"]) and ok_status
    checks["alive_after_truncate"] = bool(out["alive_after"])
    out["checks"] = checks
    return out


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


SLOW_READ_TIMEOUT_S = 3.0  # --read-timeout of the slow-clients server
SLOW_MAX_CONNECTIONS = 512  # its --max-connections (the default): the rest of the 1,000 get 503 at once
CLOSE_MARGIN_S = 3.0  # how late after the read timeout a slow connection may still be closed


async def _slow_clients(url: str, host: str, port: int, n: int, seconds: float, pid: int) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + seconds
    opened, open_failed = 0, 0
    ends: list[tuple[str, float]] = []  # (first status or how it ended, seconds from connect to close)
    writers: list[asyncio.StreamWriter] = []
    fds_during: list[tuple[float, int]] = []
    lat_burst: list[float] = []
    t_start = time.monotonic()
    health_ready = asyncio.Event()
    burst_over: list[float] = []  # when the last slow connection was opened

    async def one(i: int) -> None:
        nonlocal opened, open_failed
        await health_ready.wait()  # the monitor's keep-alive connection is open first
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (TimeoutError, OSError):
            open_failed += 1
            if opened + open_failed == n:
                burst_over.append(time.monotonic())
            return
        t0 = time.monotonic()
        opened += 1
        writers.append(writer)
        if opened + open_failed == n:
            burst_over.append(time.monotonic())
        if i % 2 == 0:  # slow headers: the header block never ends
            head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        else:  # slow body: a complete header block announcing a body that trickles
            head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n{\"prompt\": \"")  # fmt: skip

        async def read_all() -> str:
            first = b""
            with contextlib.suppress(OSError, ConnectionError):
                while chunk := await reader.read(65536):
                    first = first or chunk
            if not first.startswith(b"HTTP/"):
                return "closed"
            return first.split(b" ", 2)[1].decode("ascii", "replace")

        reading = asyncio.create_task(read_all())
        try:
            writer.write(head)
            await writer.drain()
            while time.monotonic() < deadline and not reading.done():
                await asyncio.wait([reading], timeout=1.0)
                if reading.done():
                    break
                writer.write(b"X-a: b\r\n" if i % 2 == 0 else b"a")
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        try:
            status = await asyncio.wait_for(reading, max(0.1, deadline - time.monotonic()))
            ends.append((status, time.monotonic() - t0))
        except TimeoutError:
            ends.append(("open at end", time.monotonic() - t0))

    async def monitor() -> tuple[list[float], int, list[str], list[float], list[str]]:
        # /health polls while the 1,000 connections are being opened are timed apart: this client's
        # own event loop is then busy opening them, so those times measure the harness as much as
        # the server
        lat: list[float] = []
        errors = 0
        statuses: list[str] = []
        comp: list[float] = []
        comp_status: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            await client.get("/health")  # open the kept-alive connection before the slow ones arrive
            health_ready.set()
            last_comp = 0.0
            while time.monotonic() < deadline - 0.5:
                fds_during.append((time.monotonic() - t_start, _fd_count(pid)))
                t0 = time.perf_counter()
                try:
                    r = await client.get("/health")
                    (lat if burst_over else lat_burst).append((time.perf_counter() - t0) * 1000)
                    statuses.append(str(r.status_code))
                except httpx.HTTPError as e:
                    errors += 1
                    statuses.append(type(e).__name__)
                if time.monotonic() - last_comp > 2.0:
                    last_comp = time.monotonic()
                    t0 = time.perf_counter()
                    try:
                        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
                        comp_status.append(str(r.status_code))
                    except httpx.HTTPError as e:
                        comp_status.append(type(e).__name__)
                    comp.append((time.perf_counter() - t0) * 1000)
                await asyncio.sleep(0.1)
        return lat, errors, statuses, comp, comp_status

    mon = asyncio.create_task(monitor())
    await asyncio.gather(*(one(i) for i in range(n)))
    lat, errors, statuses, comp, comp_status = await mon
    for w in writers:
        with contextlib.suppress(Exception):
            w.close()
    by_status: dict[str, int] = {}
    for status, _ in ends:
        by_status[status] = by_status.get(status, 0) + 1
    closed = [t for status, t in ends if status != "open at end"]
    late = SLOW_READ_TIMEOUT_S + CLOSE_MARGIN_S
    fds_late = [f for t, f in fds_during if t > late + 1.0]
    return {
        "clients": n, "seconds": seconds, "opened": opened, "open_failed": open_failed,
        "closed_by_server_before_end": len(closed), "endings": by_status,
        "close_after_s_max": round(max(closed, default=float("nan")), 2),
        "closed_later_than_timeout_plus_margin": sum(t > late for t in closed),
        "wall_s": round(time.monotonic() - t_start, 1),
        "server_fds_during_max": max((f for _, f in fds_during), default=-1),
        "server_fds_after_timeout_max": max(fds_late, default=-1),
        "health_polls": len(lat), "health_errors": errors, "health_p50_ms": round(fs.pct(lat, 50), 1),
        "health_max_ms": round(max(lat, default=float("nan")), 1),
        "health_max_ms_while_connecting": round(max(lat_burst, default=float("nan")), 1),
        "health_not_200": sum(s != "200" for s in statuses),
        "completion_statuses": comp_status, "completion_max_ms": round(max(comp, default=float("nan")), 1),
    }  # fmt: skip


def slow_clients_part(src: Path | None, model: str, clients: int, seconds: float) -> dict[str, Any]:
    clients, seconds = min(clients, 2000), min(seconds, 60.0)  # bounded whatever is asked
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    args = ["--model", model, "--log-level", "warning", "--read-timeout", str(SLOW_READ_TIMEOUT_S),
            "--max-connections", str(SLOW_MAX_CONNECTIONS)]  # fmt: skip
    server = fs.start_cli_server(src, args)
    if soft < clients + 100:  # our side only (the server keeps the limit it started with)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, clients + 200), hard))
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    out: dict[str, Any] = {"server_fds_before": _fd_count(server.proc.pid),
                           "read_timeout_s": SLOW_READ_TIMEOUT_S, "max_connections": SLOW_MAX_CONNECTIONS}
    try:
        out.update(asyncio.run(_slow_clients(server.url, host, int(port), clients, seconds, server.proc.pid)))
        time.sleep(2.0)
        out["server_fds_after"] = _fd_count(server.proc.pid)
        out["alive_after"] = still_answers(server.url)
    finally:
        out["server_exit_code"], _ = server.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    endings = out["endings"]
    refused = endings.get("503", 0)
    out["checks"] = {
        "health_answered_during_slow_clients": out["health_errors"] == 0 and out["health_polls"] > 0
        and out["health_not_200"] == 0,
        "health_max_under_100ms_during_slow_clients": out["health_max_ms"] < 100.0,
        "completions_ok_during_slow_clients": bool(out["completion_statuses"])
        and all(s == "200" for s in out["completion_statuses"]),
        "alive_after_slow_clients": bool(out["alive_after"]),
        "every_slow_connection_closed_by_the_server": out["closed_by_server_before_end"] == out["opened"]
        and out["opened"] == clients,
        f"closed_within_read_timeout_plus_{CLOSE_MARGIN_S:g}s":
            out["closed_later_than_timeout_plus_margin"] == 0,
        "answered_408_or_503": endings.get("408", 0) + refused == out["opened"],
        "connections_over_the_limit_refused": refused >= clients - SLOW_MAX_CONNECTIONS,
        # refused connections keep their socket for a second's grace, at most as many as the limit
        "server_fds_bounded": 0 < out["server_fds_during_max"] <= out["server_fds_before"]
        + 2 * SLOW_MAX_CONNECTIONS + 20,
        "fds_released_after_timeout": out["server_fds_after_timeout_max"] <= out["server_fds_before"] + 20,
        "fds_released": out["server_fds_after"] <= out["server_fds_before"] + 10,
    }  # fmt: skip
    return out


async def _drain_streams(server: fs.CliServer, streams: int, drain: float) -> dict[str, Any]:
    import httpx

    started = asyncio.Event()
    first_events = 0
    t_sigterm: list[float] = []
    results: list[dict[str, Any]] = []
    body = {"prompt": "tell a very long story about llamas", "max_tokens": 240, "stream": True,
            "logit_bias": {"2": -100}, "temperature": 1.0}  # fmt: skip

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal first_events
        res: dict[str, Any] = {"events": 0, "done": False, "error_event": False, "finish_reason": None}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                res["status"] = r.status_code
                if r.status_code != 200:
                    first_events += 1  # a refused request counts as started (it will not stream)
                    if first_events == streams:
                        started.set()
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    res["events"] += 1
                    if res["events"] == 1:
                        first_events += 1
                        if first_events == streams:
                            started.set()
                    payload = line[6:]
                    if payload == "[DONE]":
                        res["done"] = True
                        continue
                    with contextlib.suppress(ValueError):
                        data = json.loads(payload)
                        if "error" in data:
                            res["error_event"] = True
                        for ch in data.get("choices", []):
                            res["finish_reason"] = ch.get("finish_reason") or res["finish_reason"]
        except httpx.HTTPError as e:
            res["transport_error"] = f"{type(e).__name__}: {e}"[:160]
        res["ended_after_sigterm_s"] = round(time.monotonic() - t_sigterm[0], 2) if t_sigterm else None
        results.append(res)

    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        tasks = [asyncio.create_task(one(client)) for _ in range(streams)]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(started.wait(), 60)
        t_sigterm.append(time.monotonic())
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        try:
            r = await client.post("/v1/completions", json={"prompt": "late", "max_tokens": 1}, timeout=10)
            late = str(r.status_code)
        except httpx.HTTPError as e:
            late = type(e).__name__
        await asyncio.wait(tasks, timeout=drain + 60)
    exited = None
    with contextlib.suppress(Exception):
        await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, drain + 60)
        exited = round(time.monotonic() - t_sigterm[0], 2)
    return {"streams": results, "new_request_during_drain": late, "server_exit_after_sigterm_s": exited}


def drain_part(src: Path | None, model: str, streams: int, drain: float) -> dict[str, Any]:
    args = ["--model", model, "--log-level", "warning", "--max-slots", str(streams)]
    args += ["--drain-timeout", str(drain)]
    server = fs.start_cli_server(src, args)
    try:
        out = asyncio.run(_drain_streams(server, streams, drain))
    finally:
        code, _ = server.stop(timeout=5)
    out["server_exit_code"] = code
    out["drain_timeout_s"] = drain
    rejected = sum(s.get("status") != 200 for s in out["streams"])
    ss = [s for s in out["streams"] if s.get("status") == 200]
    out["summary"] = {
        "streams_rejected_at_start": rejected, "streams": len(ss),
        "completed_naturally": sum(s["finish_reason"] in ("stop", "length") for s in ss),
        "ended_with_done": sum(s["done"] for s in ss),
        "ended_with_error_event": sum(s["error_event"] for s in ss),
        "cut_without_terminator": sum(not s["done"] and not s["error_event"] for s in ss),
        "transport_errors": sum("transport_error" in s for s in ss),
        "latest_stream_end_after_sigterm_s": max((s["ended_after_sigterm_s"] or 0 for s in ss), default=0),
    }  # fmt: skip
    exit_s = out["server_exit_after_sigterm_s"]
    out["checks"] = {
        "server_exits_within_drain_plus_5s": exit_s is not None and exit_s <= drain + 5,
        "server_exit_code_0": code == 0,
        "streams_started": len(ss) > 0,
        "every_stream_ends_with_a_terminator": out["summary"]["cut_without_terminator"] == 0,
        "new_requests_refused_while_draining": out["new_request_during_drain"] != "200",
    }
    return out


def auth_host_part(src: Path | None, model: str) -> dict[str, Any]:
    import httpx

    key = "sk-fuzz-key"
    server = fs.start_cli_server(src, ["--model", model, "--log-level", "warning", "--api-key", key])
    auth = {"Authorization": f"Bearer {key}"}
    port = server.url.rsplit(":", 1)[1]
    big = b'{"prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    cases: list[tuple[str, str, str, bytes | None, dict[str, str], str]] = [
        ("wrong Host on /health", "GET", "/health", None, {**auth, "Host": "evil.example.com"}, "4xx"),
        ("wrong Host on /v1/models", "GET", "/v1/models", None, {**auth, "Host": "evil.example.com"}, "4xx"),
        ("wrong Host on completion", "POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 1}',
         {**auth, "Host": f"attacker.test:{port}", "Content-Type": "application/json"}, "4xx"),
        ("invalid JSON without key", "POST", "/v1/completions", b'{"prompt": ',
         {"Content-Type": "application/json"}, "401"),
        ("5 MB body without key", "POST", "/v1/completions", big, {"Content-Type": "application/json"},
         "401"),
        ("/docs without key", "GET", "/docs", None, {}, "4xx"),
        ("/redoc without key", "GET", "/redoc", None, {}, "4xx"),
        ("/openapi.json without key", "GET", "/openapi.json", None, {}, "4xx"),
        ("/v1/models without key", "GET", "/v1/models", None, {}, "401"),
        ("/v1/models wrong key", "GET", "/v1/models", None, {"Authorization": "Bearer nope"}, "401"),
        ("/metrics without key", "GET", "/metrics", None, {}, "any"),
        ("/health without key", "GET", "/health", None, {}, "any"),
        ("CONTROL /v1/models right key", "GET", "/v1/models", None, auth, "200"),
        ("CONTROL Host localhost", "GET", "/v1/models", None, {**auth, "Host": f"localhost:{port}"}, "200"),
        ("CONTROL completion right key", "POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 1}',
         {**auth, "Content-Type": "application/json"}, "200"),
    ]  # fmt: skip
    rows = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for name, method, path, body, headers, expect in cases:
                try:
                    r = client.request(method, path, content=body, headers=headers)
                    status, raw = r.status_code, r.content
                except httpx.HTTPError as e:
                    rows.append({"case": name, "status": type(e).__name__, "expect": expect, "ok": False})
                    continue
                ok = {"4xx": 400 <= status < 500, "401": status == 401, "200": status == 200,
                      "any": True}[expect]  # fmt: skip
                shaped = fs.openai_shaped(status, raw) if path.startswith("/v1") else True
                text = raw[:120].decode("utf-8", "replace")
                rows.append({"case": name, "status": status, "expect": expect, "ok": ok and shaped,
                             "openai_shape": shaped, "response": text})  # fmt: skip
    finally:
        code, _ = server.stop()
    return {"cases": rows, "server_exit_code": code,
            "checks": {f"auth_host[{r['case']}] expect {r['expect']}": r["ok"] for r in rows}}  # fmt: skip


def print_parts(report: dict[str, Any]) -> None:
    """One or a few lines per CLI-server part of a serve_faults report."""
    if "truncate" in report:
        for name, h in report["truncate"].items():
            if isinstance(h, dict) and "health_max_ms" in h:
                print(f"truncate '{name}' ({h['body_bytes'] / 1e6:.2f} MB): answered {h['status']} after "
                      f"{h['request_s']} s; /health p50 {h['health_p50_ms']} ms, max {h['health_max_ms']} ms "
                      f"({h['health_polls']} polls, {h['health_errors']} errors)")  # fmt: skip
    if "slow_clients" in report:
        s = report["slow_clients"]
        print(f"slow clients (--read-timeout {s['read_timeout_s']:g}, "
              f"--max-connections {s['max_connections']}): "
              f"{s['opened']}/{s['clients']} opened ({s['open_failed']} failed), "
              f"{s['closed_by_server_before_end']} closed by the server within {s['seconds']} s "
              f"(answers {s['endings']}, last after {s['close_after_s_max']} s); "
              f"/health p50 {s['health_p50_ms']} ms, max {s['health_max_ms']} ms "
              f"(max {s['health_max_ms_while_connecting']} ms while the connections were opened), "
              f"{s['health_errors']} errors; "
              f"completions {s['completion_statuses']} (max {s['completion_max_ms']} ms); server fds "
              f"{s['server_fds_before']} -> {s['server_fds_during_max']} (max during), "
              f"{s['server_fds_after_timeout_max']} (max after timeout + margin) -> "
              f"{s['server_fds_after']}")  # fmt: skip
    if "drain" in report:
        d = report["drain"]
        print(f"drain (--drain-timeout {d['drain_timeout_s']}): {d['summary']}; new request while draining: "
              f"{d['new_request_during_drain']}; server exit {d['server_exit_code']} after "
              f"{d['server_exit_after_sigterm_s']} s")  # fmt: skip
    if "auth_host" in report:
        for r in report["auth_host"]["cases"]:
            print(f"auth/host {r['case']:<32} -> {r['status']} (expect {r['expect']})")
