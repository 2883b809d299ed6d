"""Helpers for the server tests: a tiny random model with the real Llama 2 vocabulary, a Code Llama
tokenizer (the fixture plus 16 pieces), and a real server process on an ephemeral loopback port.

Run as a script, this file *is* that server process:
`python tests/serve/serve_support.py --port 0 [--vocab 32016] [--fault-marker TEXT] ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from llama2.config import ModelArgs
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llama2-tokenizer"
TOKENIZER_MODEL = FIXTURES / "tokenizer.model"
CODELLAMA_SPECIAL = {32007: "▁<PRE>", 32008: "▁<SUF>", 32009: "▁<MID>", 32010: "▁<EOT>"}
CONTEXT = 256


def tiny_args(vocab_size: int = 32000) -> ModelArgs:
    return ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab_size,
        multiple_of=32,
        max_seq_len=CONTEXT,
    )


def tiny_model(vocab_size: int = 32000, seed: int = 0) -> Transformer:
    """Deterministic random weights; the output head is spread so greedy decoding has no near-ties."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(tiny_args(vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name == "output.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name == "tok_embeddings.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / p.shape[-1] ** 0.5)
    return model.eval()


def _piece_entry(piece: str, score: float, piece_type: int) -> bytes:
    raw = piece.encode("utf-8")
    body = (
        b"\x0a" + bytes([len(raw)]) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + bytes([piece_type])
    )
    return b"\x0a" + bytes([len(body)]) + body


def codellama_tokenizer() -> Tokenizer:
    """The fixture vocabulary with Code Llama's 16 extra pieces (ids 32000-32015) appended; the four
    infilling pieces are control pieces. (Appending repeated protobuf fields extends the list.)"""
    extra = b"".join(
        _piece_entry(CODELLAMA_SPECIAL.get(i, f"<cl_extra_{i}>"), 0.0, 3 if i in CODELLAMA_SPECIAL else 5)
        for i in range(32000, 32016)
    )
    return Tokenizer.from_model_bytes(TOKENIZER_MODEL.read_bytes() + extra, source="codellama-test")


def tokenizer_for(vocab_size: int) -> Tokenizer:
    return codellama_tokenizer() if vocab_size == 32016 else Tokenizer.from_file(TOKENIZER_MODEL)


# ----------------------------------------------------------------------------- server process
def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any] | str]:
    """Parse `data: ...` lines; yields dicts and finally the string "[DONE]"."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        yield payload if payload == "[DONE]" else json.loads(payload)


@dataclass
class ServerProcess:
    """A running server subprocess."""

    proc: subprocess.Popen[str]
    base_url: str
    output: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


@contextmanager
def server_process(*args: str, startup_timeout: float = 60.0) -> Iterator[ServerProcess]:
    """Start `serve_support.py` with `args` on 127.0.0.1:0; yield once it listens and /health answers."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--port", "0", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    output: list[str] = []
    url: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m and not url:
                url.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(startup_timeout) or not url:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(output))
    server = ServerProcess(proc, url[0], output)
    import httpx

    deadline = time.monotonic() + startup_timeout
    while True:
        try:
            if httpx.get(server.base_url + "/health", timeout=2.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            server.stop()
            raise RuntimeError("server did not answer /health:\n" + "".join(output))
        time.sleep(0.1)
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- script entry
def main() -> None:
    from llama2.serve import server as server_mod
    from llama2.serve.scheduler import Engine

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-slots", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=16)
    parser.add_argument("--prefill-budget", type=int, default=32)
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--api-key", action="append", default=[])
    parser.add_argument("--chat-special-tags", default="reject")
    parser.add_argument(
        "--fault-marker", default=None, help="sequences whose prompt contains it fail at token 3"
    )
    parser.add_argument("--step-delay", type=float, default=0.0, help="sleep per engine step (slow model)")
    parser.add_argument("--read-timeout", type=float, default=30.0)
    parser.add_argument("--drain-timeout", type=float, default=20.0)
    parser.add_argument("--allowed-hosts", default=None, help="comma-separated (default: loopback names)")
    ns = parser.parse_args()

    marker = ns.fault_marker
    delay = ns.step_delay

    class TestEngine(Engine):
        _prompts: ClassVar[dict[int, str]] = {}

        def _accept_token(self, seq, token, logprob, top):  # type: ignore[no-untyped-def]
            if marker is not None:
                text = self._prompts.get(seq.id)
                if text is None:
                    text = self._prompts[seq.id] = self.tokenizer.decode(seq.spec.prompt)
                if marker in text and seq.sampled >= 3:
                    raise RuntimeError("injected fault")
            return super()._accept_token(seq, token, logprob, top)

        def _step(self) -> None:
            if delay:
                time.sleep(delay)
            super()._step()

    server_mod.Engine = TestEngine  # type: ignore[misc]
    torch.set_num_threads(1)
    config = server_mod.ServeConfig(
        port=ns.port,
        model_name="tiny-llama",
        max_slots=ns.max_slots,
        max_queue=ns.max_queue,
        prefill_chunk=ns.prefill_chunk,
        prefill_budget=ns.prefill_budget,
        max_body_bytes=ns.max_body_bytes,
        api_keys=tuple(ns.api_key),
        chat_special_tags=ns.chat_special_tags,
        drain_timeout_s=ns.drain_timeout,
        read_timeout_s=ns.read_timeout,
        allowed_hosts=None if ns.allowed_hosts is None else tuple(ns.allowed_hosts.split(",")),
        log_level="warning",
    )
    server_mod.run_server(config, model=tiny_model(ns.vocab), tokenizer=tokenizer_for(ns.vocab))


if __name__ == "__main__":
    main()


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    sock.settimeout(limit)
    start = time.monotonic()
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
