"""Request fuzz campaign (issue 9) against `python -m llama2 serve` on loopback.

1. >= 1,000 seeded requests (`--requests`, `--seed`), `--concurrency` at a time, mixing valid
   completions/chat, invalid-typed fields, oversized bodies and values, broken Unicode (lone
   surrogates, invalid UTF-8, NUL, BOM), mutated/truncated JSON, odd paths, methods and content
   types, and truncate-heavy bodies (`"truncate": true` with long prompts and many message pairs).
   Counted: 5xx answers, 4xx answers not in OpenAI's error shape, transport errors (reset, timeout).
2. `/health` latency while a worst-case `truncate` request is served: 20,000 message pairs with
   `"truncate": true` (~1.5 MB body), a ~4 MB prompt with `"truncate": true` (just under the
   default 4 MiB body cap), and one ~4 MB chat message (a shaped 400: the last turn is kept whole).
   /health is polled every 20 ms while the request runs; p50 / p99 / max
   are reported (goal: max under 100 ms).
3. The server must still answer a normal request afterwards and exit cleanly on SIGTERM.

    .venv/bin/python benchmarks/fuzz_requests.py --src /tmp/llama2-before/src \
        --json /tmp/fuzz-before/requests.json
    .venv/bin/python benchmarks/fuzz_requests.py --src src --json /tmp/fuzz-after/requests.json

Model: `--model chat` (the embedded model, default) or any checkpoint path. Exits 1 on any 5xx,
badly shaped 4xx, transport error, /health max >= `--health-goal-ms`, or a server that stops answering.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_support as fs

FIELDS_COMMON = ["model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "user",
                 "stream", "stream_options", "truncate"]  # fmt: skip
FIELDS_COMPLETION = [*FIELDS_COMMON, "prompt", "suffix", "echo", "logprobs", "best_of"]
FIELDS_CHAT = [*FIELDS_COMMON, "messages", "max_completion_tokens", "logprobs", "top_logprobs"]
WORDS = ["the", "llama", "walks", "over", "green", "hills", "and", "sings", "about", "code", "bread",
         "rivers", "trains", "jazz"]  # fmt: skip


def weird_values(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 0.5, -0.0, 1e308, -1e308, "",
        "x", "1", "NaN", "\u0000", "\ud800", "\udfff", "🦙" * 10, "A" * 10_000, [], [None], [1, "a"], {},
        {"a": {"b": [1]}}, [[[[[]]]]], {"type": "text", "text": "hi"}, list(range(300)),
    ])  # fmt: skip


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def valid_completion(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": text(rng, rng.randint(1, 20)), "max_tokens": rng.randint(1, 4)}
    if rng.random() < 0.5:
        body["temperature"] = rng.choice([0, 0.7, 1.0])
    if rng.random() < 0.2:
        body["stream"] = True
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.1:
        body["prompt"] = [rng.randint(3, 4000) for _ in range(rng.randint(1, 8))]
    return body


def valid_chat(rng: random.Random) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": text(rng, 5)})
    for _ in range(rng.randint(0, 2)):
        msgs += [{"role": "user", "content": text(rng, 4)}, {"role": "assistant", "content": text(rng, 4)}]
    msgs.append({"role": "user", "content": text(rng, rng.randint(1, 10))})
    body: dict[str, Any] = {"messages": msgs, "max_tokens": rng.randint(1, 4)}
    if rng.random() < 0.2:
        body["stream"] = True
    return body


def make_request(rng: random.Random, i: int) -> tuple[str, str, str, bytes, dict[str, str]]:
    """(kind, method, path, body, headers) of request number i."""
    json_h = {"Content-Type": "application/json"}
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    base = valid_chat(rng) if chat else valid_completion(rng)
    fields = FIELDS_CHAT if chat else FIELDS_COMPLETION
    kind = rng.choices(["valid", "invalid-typed", "oversized", "unicode", "json-mutation", "odd-http",
                        "truncate-heavy"], weights=[15, 25, 10, 15, 15, 8, 12])[0]  # fmt: skip
    if kind == "valid":
        return kind, "POST", path, json.dumps(base).encode(), json_h
    if kind == "invalid-typed":
        for _ in range(rng.randint(1, 3)):
            base[rng.choice(fields)] = weird_values(rng)
        if chat and rng.random() < 0.4:
            old = base.get("messages")
            msg = dict(old[-1]) if isinstance(old, list) and old and isinstance(old[-1], dict) else {}
            msg[rng.choice(["role", "content", "name", "extra"])] = weird_values(rng)
            base["messages"] = [msg]
        return kind, "POST", path, json.dumps(base, allow_nan=True).encode(), json_h
    if kind == "oversized":
        choice = rng.randrange(6)
        if choice == 0:
            big = "word " * rng.choice([2_000, 50_000, 200_000])
            if chat:
                base["messages"][-1]["content"] = big
            else:
                base["prompt"] = big
        elif choice == 1:
            base["max_tokens"] = rng.choice([10**6, 10**12, 2**63])
        elif choice == 2:
            base["n"] = rng.choice([128, 10**6])
        elif choice == 3:
            base["stop"] = ["x" * 1000] * rng.choice([4, 100, 10_000])
        elif choice == 4:
            base["logit_bias"] = {str(k): 1.0 for k in range(rng.choice([100, 5000, 50_000]))}
        else:
            raw = b'{"prompt": "' + b"y" * (4 * 1024 * 1024 + rng.randint(1, 1000)) + b'"}'
            return kind, "POST", "/v1/completions", raw, json_h
        return kind, "POST", path, json.dumps(base).encode(), json_h
    if kind == "unicode":
        raw = json.dumps(base).encode()
        choice = rng.randrange(6)
        if choice == 0:  # invalid UTF-8 byte sequences inside a string
            bad = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"])
            raw = raw.replace(b'"max_tokens"', b'"user": "' + bad + b'", "max_tokens"', 1)
        elif choice == 1:  # lone surrogate escapes
            raw = raw.replace(b'"max_tokens"', b'"user": "\\ud800\\udc00\\udbff", "max_tokens"', 1)
            key = b'"content": "' if chat else b'"prompt": "'
            raw = raw.replace(key, key + rng.choice([b"\\ud800", b"\\udfff", b"\\ud83d"]), 1)
        elif choice == 2:
            raw = b"\xef\xbb\xbf" + raw  # BOM
        elif choice == 3:
            raw = raw.replace(b'"max_tokens"', b'"user": "a\\u0000b", "max_tokens"', 1)
        elif choice == 4:
            raw = raw.decode().encode("utf-16")
        else:
            raw = raw.decode().encode("latin-1", "replace") + b"\xe9"
        return kind, "POST", path, raw, json_h
    if kind == "json-mutation":
        raw = bytearray(json.dumps(base).encode())
        choice = rng.randrange(5)
        if choice == 0:
            for _ in range(rng.randint(1, 5)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif choice == 1:
            raw = raw[: rng.randrange(len(raw))]
        elif choice == 2:
            depth = rng.choice([100, 10_000, 200_000])
            raw = bytearray(b'{"prompt": ' + b"[" * depth + b"]" * depth + b', "max_tokens": 1}')
        elif choice == 3:
            raw = bytearray(rng.choice([b"null", b"[]", b"1", b'"s"', b"{}", b"", b"{" * 50]))
        else:
            dup = b', "max_tokens": 1, "max_tokens": -1}'
            raw = bytearray(json.dumps(base).encode()[:-1] + dup)
        return kind, "POST", path, bytes(raw), json_h
    if kind == "odd-http":
        choice = rng.randrange(6)
        if choice == 0:
            return kind, rng.choice(["GET", "PUT", "DELETE", "PATCH"]), path, b"", {}
        if choice == 1:
            ctype = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                "application/xml"])  # fmt: skip
            return kind, "POST", path, json.dumps(base).encode(), {"Content-Type": ctype}
        if choice == 2:
            return kind, "GET", rng.choice(["/v1/engines", "/../../etc/passwd", "/v1/models/x/../..",
                                            "/%00", "/v1/completions?x=" + "a" * 5000]), b"", {}
        if choice == 3:
            return kind, "POST", "/v1/models", b"{}", json_h
        if choice == 4:
            return kind, "GET", rng.choice(["/health", "/metrics", "/v1/models", "/openapi.json"]), b"", {}
        return kind, "POST", path, json.dumps(base).encode(), {**json_h, "Content-Encoding": "gzip"}
    # truncate-heavy
    base["truncate"] = True
    base["max_tokens"] = rng.choice([1, 4, 200, 10**6])
    if chat:
        pairs = rng.choice([10, 300, 2_000])
        msgs: list[dict[str, Any]] = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": text(rng, 10)})
        for _ in range(pairs):
            msgs.append({"role": "user", "content": text(rng, 6)})
            msgs.append({"role": "assistant", "content": text(rng, 6)})
        msgs.append({"role": "user", "content": text(rng, 6)})
        base["messages"] = msgs
    else:
        base["prompt"] = text(rng, rng.choice([300, 5_000, 60_000]))
    return kind, "POST", path, json.dumps(base).encode(), json_h


async def fuzz(url: str, n: int, seed: int, concurrency: int, timeout: float) -> dict[str, Any]:
    import httpx

    rng = random.Random(seed)
    plan = [make_request(rng, i) for i in range(n)]
    statuses: dict[str, dict[str, int]] = {}
    failures: list[dict[str, Any]] = []
    transport: list[dict[str, Any]] = []
    sem = asyncio.Semaphore(concurrency)
    done = [0]
    start = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(i: int) -> None:
            kind, method, path, body, headers = plan[i]
            async with sem:
                try:
                    r = await client.request(method, path, content=body or None, headers=headers)
                    status, raw = r.status_code, r.content
                except httpx.HTTPError as e:
                    transport.append({"i": i, "kind": kind, "path": path,
                                      "error": f"{type(e).__name__}: {e}"[:200],
                                      "body": body[:200].decode("utf-8", "replace")})  # fmt: skip
                    return
            done[0] += 1
            if done[0] % 100 == 0:
                msg = f"  {done[0]}/{n} requests, {time.monotonic() - start:.0f} s"
                print(msg, file=sys.stderr, flush=True)
            per = statuses.setdefault(kind, {})
            per[str(status)] = per.get(str(status), 0) + 1
            if status >= 500 or not fs.openai_shaped(status, raw):
                failures.append({"i": i, "kind": kind, "method": method, "path": path, "status": status,
                                 "body": body[:200].decode("utf-8", "replace"),
                                 "response": raw[:200].decode("utf-8", "replace")})  # fmt: skip

        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.monotonic() - start
    total: dict[str, int] = {}
    for per in statuses.values():
        for s, c in per.items():
            total[s] = total.get(s, 0) + c
    return {
        "requests": n, "seed": seed, "wall_s": round(wall, 1), "statuses": dict(sorted(total.items())),
        "statuses_by_kind": statuses, "count_5xx": sum(c for s, c in total.items() if s.startswith("5")),
        "count_bad_shape_4xx": sum(1 for f in failures if 400 <= f["status"] < 500),
        "transport_errors": len(transport), "failures": failures[:40], "transport": transport[:20],
    }  # fmt: skip


def worst_truncate_bodies() -> dict[str, tuple[str, bytes]]:
    msgs: list[dict[str, str]] = [{"role": "system", "content": "be brief"}]
    for i in range(20_000):
        msgs += [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]
    msgs.append({"role": "user", "content": "and finally?"})
    chat = json.dumps({"messages": msgs, "max_tokens": 4, "truncate": True}).encode()
    prefix, suffix = b'{"prompt": "', b'", "max_tokens": 4, "truncate": true}'
    room = 4 * 1024 * 1024 - len(prefix) - len(suffix) - 64
    prompt = prefix + (b"llama " * (room // 6 + 1))[:room] + suffix
    # one 4 MB user message: truncation keeps the last user turn whole, so this is a shaped 400
    prefix = b'{"messages": [{"role": "user", "content": "'
    suffix = b'"}], "max_tokens": 4, "truncate": true}'
    room = 4 * 1024 * 1024 - len(prefix) - len(suffix) - 64
    message = prefix + (b"llama " * (room // 6 + 1))[:room] + suffix
    return {"chat 20k pairs truncate": ("/v1/chat/completions", chat),
            "4 MB prompt truncate": ("/v1/completions", prompt),
            "chat 4 MB message truncate": ("/v1/chat/completions", message)}  # fmt: skip


async def health_during(
    url: str, path: str, body: bytes, timeout: float, poll_s: float = 0.02, health_timeout: float = 10.0
) -> dict[str, Any]:
    """Send `body` and poll /health every `poll_s` until it is answered (or `timeout`); /health
    latencies in ms. A poll still pending when the request ends is waited for (up to
    `health_timeout`); a poll that times out counts as an error with latency `health_timeout`."""
    import httpx

    lat: list[float] = []
    health_errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as big, \
            httpx.AsyncClient(base_url=url, timeout=health_timeout) as small:  # fmt: skip
        start = time.monotonic()
        task = asyncio.create_task(big.post(path, content=body, headers={"Content-Type": "application/json"}))
        await asyncio.sleep(0.05)
        while not task.done():
            t0 = time.perf_counter()
            try:
                await small.get("/health")
            except httpx.HTTPError:
                health_errors += 1
            lat.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(poll_s)
        duration = time.monotonic() - start
        try:
            r = task.result()
            status: int | str = r.status_code
            shaped = fs.openai_shaped(r.status_code, r.content)
            detail = r.text[:200]
        except httpx.HTTPError as e:
            status, shaped, detail = type(e).__name__, False, str(e)[:200]
        # how long until the server answers /health again (it may still be busy after a client timeout)
        t0 = time.monotonic()
        recovered: float | None = None
        while time.monotonic() - t0 < 60:
            try:
                await small.get("/health", timeout=5)
                recovered = round(time.monotonic() - t0, 2)
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.5)
    return {
        "body_bytes": len(body), "status": status, "error_shape_ok": shaped, "request_s": round(duration, 2),
        "health_polls": len(lat), "health_errors": health_errors,
        "health_p50_ms": round(fs.pct(lat, 50), 1), "health_p99_ms": round(fs.pct(lat, 99), 1),
        "health_max_ms": round(max(lat, default=float("nan")), 1), "response": detail,
        "health_back_after_s": recovered,
    }  # fmt: skip


def still_answers(url: str) -> bool:
    import httpx

    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "ping", "max_tokens": 2}, timeout=60)
        return r.status_code == 200 and httpx.get(url + "/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=None, help="tree the server imports (PYTHONPATH)")
    p.add_argument("--model", default="chat", help="checkpoint or embedded model (default: chat)")
    p.add_argument("--requests", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--health-goal-ms", type=float, default=100.0)
    p.add_argument("--skip-fuzz", action="store_true", help="only the /health-during-truncate part")
    p.add_argument("--json", type=Path, default=None)
    return p


def main() -> int:
    ns = parser().parse_args()
    src = ns.src.resolve() if ns.src is not None else None
    server = fs.start_cli_server(src, ["--model", ns.model, "--log-level", "warning", "--max-slots", "8"])
    out: dict[str, Any] = {"src": str(src), "model": ns.model}
    try:
        if not ns.skip_fuzz:
            out["fuzz"] = asyncio.run(fuzz(server.url, ns.requests, ns.seed, ns.concurrency, ns.timeout))
            out["alive_after_fuzz"] = still_answers(server.url)
        out["health_during_truncate"] = {
            name: asyncio.run(health_during(server.url, path, body, ns.timeout))
            for name, (path, body) in worst_truncate_bodies().items()
        }
        out["alive_at_end"] = still_answers(server.url)
    finally:
        code, secs = server.stop()
        out["server_exit_code"], out["server_exit_s"] = code, round(secs, 2)
        out["server_log_tail"] = [ln.rstrip() for ln in server.log[-15:]]
    checks: dict[str, bool] = {}
    if "fuzz" in out:
        f = out["fuzz"]
        print(f"fuzzed requests: {f['requests']} in {f['wall_s']} s; statuses {f['statuses']}")
        print(f"  5xx: {f['count_5xx']}   4xx not OpenAI-shaped: {f['count_bad_shape_4xx']}   "
              f"transport errors: {f['transport_errors']}")  # fmt: skip
        for kind, per in sorted(f["statuses_by_kind"].items()):
            print(f"  {kind:<15} {per}")
        for x in f["failures"][:10]:
            print(f"  FAIL {x['status']} {x['kind']} {x['method']} {x['path']}: {x['response'][:120]}")
        for x in f["transport"][:5]:
            print(f"  TRANSPORT {x['kind']} {x['path']}: {x['error'][:120]}")
        checks["no_5xx"] = f["count_5xx"] == 0
        checks["4xx_openai_shaped"] = f["count_bad_shape_4xx"] == 0
        checks["no_transport_errors"] = f["transport_errors"] == 0
        checks["alive_after_fuzz"] = bool(out["alive_after_fuzz"])
    for name, h in out["health_during_truncate"].items():
        print(f"/health during '{name}' ({h['body_bytes'] / 1e6:.2f} MB, answered {h['status']} after "
              f"{h['request_s']} s): p50 {h['health_p50_ms']} ms, p99 {h['health_p99_ms']} ms, "
              f"max {h['health_max_ms']} ms over {h['health_polls']} polls ({h['health_errors']} timed out); "
              f"/health answered again {h['health_back_after_s']} s after it")  # fmt: skip
        ok = h["health_max_ms"] < ns.health_goal_ms and h["health_errors"] == 0
        checks[f"health_under_{ns.health_goal_ms:g}ms_during_{name.replace(' ', '_')}"] = ok
    checks["alive_at_end"] = bool(out["alive_at_end"])
    checks["server_exit_clean"] = out["server_exit_code"] == 0
    out["checks"] = checks
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if ns.json is not None:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {ns.json}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
