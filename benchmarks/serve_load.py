"""Load test of the OpenAI-compatible server: concurrent streaming clients on loopback.

Starts a server process on 127.0.0.1 (ephemeral port) with a checkpoint (`--model`) or, by default, a
small random-weight model with the real Llama 2 vocabulary, then for each concurrency level runs the
same set of greedy streaming requests and reports throughput (generated tokens/s), time to first
token and latency percentiles. Checks:
  - nothing is lost: every request answers 200 and every stream ends with `data: [DONE]`;
  - greedy outputs under load are identical to the same requests run alone (concurrency 1);
  - aggregate throughput at concurrency 32 is at least 4x the throughput at concurrency 1.

    python benchmarks/serve_load.py                     # random model, levels 1, 8, 32, 64
    python benchmarks/serve_load.py --model ckpt/ --json

Exits with status 1 when a check fails. Bounded: `--requests` per level, `--level-timeout` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO / ".." / "shared" / "fixtures" / "llama2-tokenizer" / "tokenizer.model"


# ---------------------------------------------------------------------------- server process
def serve_main(ns: argparse.Namespace) -> None:
    """Runs in the child process: build the model and serve until SIGTERM."""
    import torch

    from llama2.config import ModelArgs
    from llama2.model import Transformer
    from llama2.serve.server import ServeConfig, run_server
    from llama2.tokenizer import Tokenizer

    if ns.threads:
        torch.set_num_threads(ns.threads)
    model = None
    tokenizer = None
    if ns.model is None:
        torch.manual_seed(0)
        args = ModelArgs(
            dim=ns.random_dim,
            n_layers=ns.random_layers,
            n_heads=max(1, ns.random_dim // 64),
            vocab_size=32000,
            multiple_of=32,
            max_seq_len=ns.context,
        )
        model = Transformer(args).eval()
        with torch.no_grad():  # spread the logits: no near-ties for greedy decoding
            model.output.weight.normal_(0.0, 0.5)
        tokenizer = Tokenizer.from_file(ns.tokenizer)
    config = ServeConfig(
        model_path=ns.model,
        tokenizer_path=ns.tokenizer if ns.model is not None and ns.tokenizer_given else None,
        model_name="bench",
        port=0,
        max_slots=ns.max_slots,
        max_seq_len=ns.context if ns.model is not None else None,
        max_queue=4 * ns.max_slots,
        prefill_chunk=ns.prefill_chunk,
        max_sequences_per_request=16,
        log_level="warning",
    )
    run_server(config, model=model, tokenizer=tokenizer)


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def start_server(ns: argparse.Namespace, extra: list[str] | None = None) -> Server:
    """Start this script in server mode and wait until it answers /health."""
    import httpx

    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-child"]
    for name in ("max_slots", "prefill_chunk", "context", "random_dim", "random_layers", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(ns, name))]
    cmd += ["--tokenizer", str(ns.tokenizer)]
    if ns.model is not None:
        cmd += ["--model", str(ns.model)]
    if ns.tokenizer_given:
        cmd += ["--tokenizer-given"]
    cmd += extra or []
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    log: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(180) or not found:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(log))
    server = Server(proc, found[0], log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError("server did not answer /health:\n" + "".join(log))


# ---------------------------------------------------------------------------- clients
@dataclass
class Outcome:
    ok: bool
    text: str = ""
    tokens: int = 0
    ttft: float = float("nan")
    latency: float = float("nan")
    error: str = ""


async def stream_one(client: Any, prompt: str, max_tokens: int) -> Outcome:
    """One greedy streaming completion; ok only with status 200, a usage chunk and `[DONE]` last."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    out = Outcome(ok=False)
    parts: list[str] = []
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    continue
                data = json.loads(payload)
                if "error" in data:
                    out.error = str(data["error"])
                for choice in data.get("choices", []):
                    if choice.get("text") and out.ttft != out.ttft:  # first text (NaN check)
                        out.ttft = time.perf_counter() - start
                    parts.append(choice.get("text", ""))
                if data.get("usage"):
                    out.tokens = int(data["usage"]["completion_tokens"])
    except Exception as e:  # network errors count as lost requests
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.latency = time.perf_counter() - start
    out.text = "".join(parts)
    out.ok = done and not out.error and out.tokens > 0
    if not done and not out.error:
        out.error = "stream ended without [DONE]"
    return out


async def run_level(
    url: str, prompts: list[str], concurrency: int, max_tokens: int, timeout: float
) -> tuple[list[Outcome], float]:
    """`concurrency` clients share the prompt list (each takes the next prompt when done)."""
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    results: list[Outcome | None] = [None] * len(prompts)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results[i] = await stream_one(client, prompts[i], max_tokens)

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout)
        wall = time.perf_counter() - start
    return [r if r is not None else Outcome(ok=False, error="not run") for r in results], wall


def pct(values: list[float], q: float) -> float:
    vals = sorted(v for v in values if v == v)
    if not vals:
        return float("nan")
    k = min(len(vals) - 1, max(0, round(q / 100 * (len(vals) - 1))))
    return vals[k]


@dataclass
class LevelReport:
    concurrency: int
    requests: int
    ok: int
    lost: int
    mismatches: int
    generated_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    errors: list[str]


def summarize(concurrency: int, outs: list[Outcome], wall: float, reference: list[str] | None) -> LevelReport:
    ok = [o for o in outs if o.ok]
    mismatches = 0
    if reference is not None:
        mismatches = sum(1 for o, ref in zip(outs, reference, strict=True) if o.ok and o.text != ref)
    tokens = sum(o.tokens for o in ok)
    ttft = [o.ttft * 1000 for o in ok]
    lat = [o.latency * 1000 for o in ok]
    return LevelReport(
        concurrency=concurrency,
        requests=len(outs),
        ok=len(ok),
        lost=len(outs) - len(ok),
        mismatches=mismatches,
        generated_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else float("nan"),
        ttft_p50_ms=pct(ttft, 50),
        ttft_p90_ms=pct(ttft, 90),
        ttft_p99_ms=pct(ttft, 99),
        latency_p50_ms=pct(lat, 50),
        latency_p90_ms=pct(lat, 90),
        latency_p99_ms=pct(lat, 99),
        errors=sorted({o.error for o in outs if o.error})[:5],
    )


def make_prompts(n: int) -> list[str]:
    topics = ["llamas", "compilers", "the ocean", "bread", "trains", "jazz", "glaciers", "chess"]
    return [
        f"Request {i}: write a few words about {topics[i % len(topics)]}" + " please" * (i % 7)
        for i in range(n)
    ]


def table(reports: list[LevelReport]) -> str:
    head = (
        f"{'conc':>5} {'reqs':>5} {'ok':>4} {'lost':>4} {'diff':>4} {'tok/s':>9} "
        f"{'ttft p50':>9} {'p90':>8} {'p99':>8} {'lat p50':>9} {'p90':>8} {'p99':>8}  (ms)"
    )
    rows = [head, "-" * len(head)]
    for r in reports:
        rows.append(
            f"{r.concurrency:>5} {r.requests:>5} {r.ok:>4} {r.lost:>4} {r.mismatches:>4} "
            f"{r.tokens_per_s:>9.1f} "
            f"{r.ttft_p50_ms:>9.1f} {r.ttft_p90_ms:>8.1f} {r.ttft_p99_ms:>8.1f} "
            f"{r.latency_p50_ms:>9.1f} {r.latency_p90_ms:>8.1f} {r.latency_p99_ms:>8.1f}"
        )
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: a random model)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer (default: the shared fixture)")
    p.add_argument("--levels", default="1,8,32,64", help="concurrency levels, comma-separated")
    p.add_argument(
        "--requests", type=int, default=64, help="requests per level (the same prompts each level)"
    )
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--max-slots", type=int, default=64, help="server KV-cache slots")
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--context", type=int, default=256, help="context window of the server")
    p.add_argument("--random-dim", type=int, default=256, help="random model width")
    p.add_argument("--random-layers", type=int, default=4, help="random model depth")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server (0: default)")
    p.add_argument("--level-timeout", type=float, default=300.0, help="seconds per level")
    p.add_argument("--min-speedup", type=float, default=4.0, help="required tok/s(32) / tok/s(1)")
    p.add_argument("--json", action="store_true", help="print a JSON report instead of a table")
    p.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-given", action="store_true", help=argparse.SUPPRESS)
    return p


def resolve(ns: argparse.Namespace) -> argparse.Namespace:
    if not ns.serve_child:
        ns.tokenizer_given = ns.tokenizer is not None
    if ns.tokenizer is None:
        ns.tokenizer = DEFAULT_TOKENIZER.resolve()
    return ns


def main() -> int:
    ns = resolve(parser().parse_args())
    if ns.serve_child:
        serve_main(ns)
        return 0
    levels = [int(x) for x in ns.levels.split(",") if x.strip()]
    prompts = make_prompts(ns.requests)
    server = start_server(ns)
    reports: list[LevelReport] = []
    reference: list[str] | None = None
    try:
        for c in levels:
            outs, wall = asyncio.run(run_level(server.url, prompts, c, ns.max_tokens, ns.level_timeout))
            rep = summarize(c, outs, wall, reference)
            if reference is None and c == 1:  # concurrency 1: every request alone = the reference outputs
                reference = [o.text for o in outs]
            reports.append(rep)
            if not ns.json:
                print(
                    f"  level {c}: {rep.ok}/{rep.requests} ok, {rep.tokens_per_s:.1f} tok/s", file=sys.stderr
                )
    finally:
        code = server.stop()
    by_c = {r.concurrency: r for r in reports}
    checks: dict[str, bool] = {
        "nothing_lost": all(r.lost == 0 for r in reports),
        "greedy_equal_to_solo": reference is not None and all(r.mismatches == 0 for r in reports),
        "server_exit_clean": code == 0,
    }
    speedup = None
    if 1 in by_c and 32 in by_c:
        speedup = by_c[32].tokens_per_s / by_c[1].tokens_per_s
        checks["throughput_32_vs_1"] = speedup >= ns.min_speedup
    if ns.json:
        print(
            json.dumps(
                {"levels": [asdict(r) for r in reports], "speedup_32_vs_1": speedup, "checks": checks},
                indent=2,
            )
        )
    else:
        print(table(reports))
        if speedup is not None:
            print(f"throughput at 32 / at 1: {speedup:.2f}x (required >= {ns.min_speedup}x)")
        for name, ok in checks.items():
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
