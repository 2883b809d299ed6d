"""Run the OpenAI-compatible server with uvicorn: `run_server(ServeConfig(model_path=...))`.

Binds to 127.0.0.1 unless told otherwise. On SIGTERM/SIGINT uvicorn stops accepting connections and
lets in-flight requests (streams included) finish for up to `drain_timeout_s`; requests still running
then are cut (a stream ends with an error event and `data: [DONE]`, a waiting request gets 503), the
app's shutdown stops the engine thread, and the process exits with status 0.

What one connection can hold is bounded: the request head (16 KiB, `HEADER_LIMIT_BYTES`) must
arrive within `read_timeout_s` of connecting (or of the first byte of a later keep-alive request),
the body (`max_body_bytes`) within `read_timeout_s` of the head, and an idle keep-alive connection
is closed after 5 s (uvicorn's `timeout_keep_alive`). At most `max_connections` connections are
open at once; one more is answered 503 at once and closed (see `connection.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Literal

from llama2.dtypes import dtype_table
from llama2.errors import ConfigError
from llama2.quant.schemes import SPEC_HELP as QUANTIZE_HELP
from llama2.serve.app import AppSettings, begin_drain, create_app
from llama2.serve.metrics import ServeMetrics
from llama2.serve.middleware import LOOPBACK_HOSTS
from llama2.serve.scheduler import Engine, EngineConfig
from llama2.tokenizer import Tokenizer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llama2.model import Transformer

log = logging.getLogger("llama2.serve")

_DTYPES = dtype_table()  # every spelling of llama2.dtypes
API_KEY_ENV = "LLAMA2_API_KEY"
_CUT_MARGIN_S = 3.0  # uvicorn cancels what is left this long after the app cut its requests


@dataclass(frozen=True)
class ServeConfig:
    """Everything `llama2 serve` needs; the model is fixed here at start-up.

    Attributes:
        model_path: checkpoint folder or file (any format `load_model` reads).
        tokenizer_path: `tokenizer.model` or GGUF; default: the one next to the checkpoint.
        model_name: id shown in `/v1/models` (default: the checkpoint folder's name).
        host: interface to bind; 127.0.0.1 keeps the server local.
        port: TCP port; 0 picks a free one (the chosen port is printed).
        api_keys: accepted bearer keys (none: no authentication).
        api_key_file: a file with one key per line (`#` comments and blank lines skipped).
        allowed_hosts: `Host` header names served, any port (`*`: any). None: the loopback names
            (localhost, 127.0.0.1, [::1]) when `host` is a loopback address, else any.
        max_slots: sequences decoded together (KV-cache rows).
        max_seq_len: context window (default: the checkpoint's).
        max_queue: sequences that may wait for a slot before requests get 429.
        prefill_chunk: prompt tokens per prefill forward.
        prefill_budget: prompt tokens prefilled per engine step.
        compile: decode through `torch.compile` (mode "default"; the first steps pay the compilation).
        max_body_bytes: request bodies above this get 413.
        max_prompt_tokens: prompts above this get 400 (default: the context window).
        max_sequences_per_request: cap on `n` times the number of prompts.
        chat_special_tags: "reject" (400) or "sanitize" special chat tags inside messages.
        drain_timeout_s: how long SIGTERM waits for in-flight requests before cutting them.
        read_timeout_s: deadline for a request's head (from connecting) and for its body (from the
            head); 408 after it.
        max_connections: open connections at once; more are answered 503 and closed. The default
            (512) keeps the process well under the usual limit of 1,024 open files (the model and
            libraries hold some too): past that limit accept() fails and new connections, /health
            included, stall. Start-up raises the soft limit (up to the hard one) when needed.
        device: torch device of the model.
        dtype: weight dtype name (float32, bfloat16, float16); None keeps the checkpoint's.
        quantize: quantization scheme applied while loading ("nf4", "int4,groupsize=64", ...), or None.
        threads: torch intra-op threads (None: one per physical core, see `configure_threads`).
        log_level: uvicorn's log level.
    """

    model_path: Path | None = None
    tokenizer_path: Path | None = None
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    api_key_file: Path | None = None
    allowed_hosts: tuple[str, ...] | None = None
    max_slots: int = 8
    max_seq_len: int | None = None
    max_queue: int = 64
    prefill_chunk: int = 128
    prefill_budget: int = 256
    compile: bool = False
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None
    max_sequences_per_request: int = 16
    chat_special_tags: Literal["reject", "sanitize"] = "reject"
    drain_timeout_s: float = 30.0
    read_timeout_s: float = 30.0
    max_connections: int = 512
    device: str = "cpu"
    dtype: str | None = None
    quantize: str | None = None
    threads: int | None = None
    log_level: str = "info"

    def all_api_keys(self) -> tuple[str, ...]:
        """Keys from `api_keys` and `api_key_file`.

        Raises:
            ConfigError: the key file is missing or holds no key.
        """
        keys = [k for k in self.api_keys if k]
        if self.api_key_file is not None:
            path = Path(self.api_key_file)
            if not path.is_file():
                raise ConfigError(
                    f"API key file {path} does not exist; expected a file with one key per line"
                )
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            file_keys = [ln for ln in lines if ln and not ln.startswith("#")]
            if not file_keys:
                raise ConfigError(f"API key file {path} holds no key; expected one key per line")
            keys += file_keys
        return tuple(keys)


def build_app(
    config: ServeConfig, *, model: Transformer | None = None, tokenizer: Tokenizer | None = None
) -> tuple[FastAPI, Engine]:
    """Load the model (unless given), build the engine and the app.

    Args:
        config: server settings.
        model: an already built model (tests, benchmarks); otherwise `config.model_path` is loaded.
        tokenizer: its tokenizer; otherwise read from `config.tokenizer_path` or the checkpoint.

    Returns:
        The app and its (not yet started) engine.

    Raises:
        ConfigError: no model, or a bad setting.
        CheckpointError: the checkpoint cannot be read.
        TokenizerError: no tokenizer given or found, or it cannot be read.
    """
    from llama2.runtime import configure_threads

    configure_threads(config.threads)
    tokenizer_path, found = config.tokenizer_path, None
    name = config.model_name
    if model is None:
        if config.model_path is None:
            raise ConfigError("no model given; pass a checkpoint path (ServeConfig.model_path / --model)")
        from llama2.checkpoint.load import load_model

        dtype = _DTYPES.get(config.dtype) if config.dtype else None
        if config.dtype and dtype is None:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}")
        loaded = load_model(
            config.model_path,
            device=config.device,
            dtype=dtype,
            max_seq_len=config.max_seq_len,
            quantize=config.quantize,
        )
        model = loaded.model
        found = loaded.tokenizer_path
        name = name or Path(config.model_path).resolve().name
    if tokenizer is None:
        from llama2.checkpoint.tokenizer_path import require_tokenizer

        hint, source = "pass one (ServeConfig.tokenizer_path / --tokenizer)", config.model_path or "in memory"
        tokenizer = Tokenizer.from_file(require_tokenizer(found, tokenizer_path, source, hint))
    model.eval()
    metrics = ServeMetrics()
    engine = Engine(
        model,
        tokenizer,
        EngineConfig(
            max_slots=config.max_slots,
            max_seq_len=config.max_seq_len,
            max_queue=config.max_queue,
            prefill_chunk=config.prefill_chunk,
            prefill_budget=config.prefill_budget,
            compile="default" if config.compile else None,
        ),
        metrics,
    )
    settings = AppSettings(
        model_name=name or "llama2",
        api_keys=config.all_api_keys(),
        max_body_bytes=config.max_body_bytes,
        max_prompt_tokens=config.max_prompt_tokens,
        max_sequences_per_request=config.max_sequences_per_request,
        chat_special_tags=config.chat_special_tags,
        drain_timeout_s=config.drain_timeout_s,
        read_timeout_s=config.read_timeout_s,
        allowed_hosts=config.allowed_hosts or (),
    )
    return create_app(engine, tokenizer, settings, metrics), engine


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The `Host` names served when none are given: the loopback names for a loopback bind, else any."""
    name = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name.lower() == "localhost"
    return LOOPBACK_HOSTS if loopback else ("*",)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: the OS picks a free port).

    Raises:
        ConfigError: the address cannot be bound (port in use, no permission, unknown host).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP (accepted
    # sockets inherit it); with Nagle on, every reply on a kept-alive connection waited ~40 ms for the
    # client's delayed ACK, and so did every SSE event after the first.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        reason = e.strerror or str(e)
        raise ConfigError(f"cannot bind {shown}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


_SPARE_FILES = 256  # descriptors besides the connections: model files, libraries, the listening socket


def ensure_file_limit(max_connections: int) -> None:
    """Raise the soft open-file limit to fit `max_connections` connections, as many refused ones
    waiting to be closed (see `connection.py`) and spare descriptors, as far as the hard limit allows.

    Raises:
        ConfigError: `max_connections` is not positive, or the hard limit is too low for it.
    """
    if max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, got {max_connections}")
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    needed = max_connections + _SPARE_FILES
    wanted = needed + max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ConfigError(
                f"--max-connections {max_connections} needs {needed} open files, but this process may "
                f"open at most {hard} (ulimit -Hn); lower --max-connections to {max(1, hard - _SPARE_FILES)} "
                "or raise the limit"
            )
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))


def run_server(
    config: ServeConfig, *, model: Transformer | None = None, tokenizer: Tokenizer | None = None
) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight requests and return.

    Prints `llama2 serve: listening on http://HOST:PORT` on stdout once the socket is bound.

    Args:
        config: server settings (see `ServeConfig`).
        model: optional prebuilt model (else `config.model_path` is loaded).
        tokenizer: optional prebuilt tokenizer.

    Raises:
        ConfigError: the address cannot be bound (checked before the model is loaded), or a bad setting.
    """
    import uvicorn

    from llama2.serve.connection import HEADER_LIMIT_BYTES, header_timeout_protocol

    if config.allowed_hosts is None:
        config = dataclasses.replace(config, allowed_hosts=default_allowed_hosts(config.host))
    keys = config.all_api_keys()
    ensure_file_limit(config.max_connections)
    sock = bind_socket(config.host, config.port)
    try:
        app, _ = build_app(config, model=model, tokenizer=tokenizer)
    except BaseException:
        sock.close()
        raise
    if config.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        log.warning(
            "serving on %s without API keys: anyone who can reach this port can use the model", config.host
        )
    port = sock.getsockname()[1]
    uv_config = uvicorn.Config(
        app,
        http=header_timeout_protocol(config.read_timeout_s, config.max_connections),
        h11_max_incomplete_event_size=HEADER_LIMIT_BYTES,
        log_level=config.log_level,
        timeout_graceful_shutdown=math.ceil(max(1.0, config.drain_timeout_s + _CUT_MARGIN_S)),
        access_log=False,
        lifespan="on",
    )

    class DrainingServer(uvicorn.Server):
        """Tells the app when shutdown starts, so it can cut its requests cleanly at the deadline."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            begin_drain(app)
            await super().shutdown(sockets=sockets)

    server = DrainingServer(uv_config)
    # The model, tokenizer and libraries are a few hundred thousand long-lived objects; every full
    # garbage collection would walk them all while holding the GIL (over a second on a busy machine,
    # triggered by the allocations of one large request), stalling the event loop. Freeze them.
    gc.collect()
    gc.freeze()
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"llama2 serve: listening on http://{host}:{port}", flush=True)
    # uvicorn re-raises a captured SIGTERM once it has drained, which would kill the process with
    # status -15; after a clean drain we return normally instead (exit status 0).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _ignore_signal) if main_thread else None
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    log.info("llama2 serve: drained and stopped")


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """Handler restored by uvicorn after its graceful shutdown; the drain is already done."""


# ------------------------------------------------------------------------------ CLI wiring
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `llama2 serve`'s options to a parser (the lead's cli.py calls this)."""
    d = ServeConfig()
    parser.add_argument(
        "--model",
        default="chat",
        help="checkpoint folder or file, or an embedded model name: base, chat, code (default: chat)",
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer.model or GGUF (default: beside the model)"
    )
    parser.add_argument("--model-name", default=None, help="id shown in /v1/models (default: folder name)")
    parser.add_argument("--host", default=d.host, help="interface to bind (default 127.0.0.1: local only)")
    parser.add_argument("--port", type=int, default=d.port, help="TCP port (0: any free port)")
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help=f"file with one accepted bearer key per line; or set the environment variable {API_KEY_ENV} "
        "(keys separated by commas). Both may be combined",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help=f"accepted bearer key (repeatable); visible to every user in the process list, prefer "
        f"--api-key-file or {API_KEY_ENV}",
    )
    parser.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="NAMES",
        help="comma-separated Host header names served, any port ('*': any). Default: localhost,"
        "127.0.0.1,[::1] when --host is a loopback address (a browser page cannot reach the server "
        "through another name: DNS rebinding), else any. Other hosts get 421",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=d.read_timeout_s,
        help="seconds a client has to send the request line and headers (from connecting) and then "
        "the body; 408 after them",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help=f"open connections at once; more are answered 503 and closed (default {d.max_connections}: well "
        "under the usual limit of 1,024 open files, past which new connections, /health included, stall)",
    )
    parser.add_argument("--max-slots", type=int, default=d.max_slots, help="sequences decoded together")
    parser.add_argument("--max-seq-len", type=int, default=None, help="context window (default: the model's)")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting sequences before 429")
    parser.add_argument(
        "--prefill-chunk", type=int, default=d.prefill_chunk, help="prompt tokens per prefill call"
    )
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body cap (413)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="prompt length cap (400)")
    parser.add_argument(
        "--chat-special-tags",
        choices=("reject", "sanitize"),
        default=d.chat_special_tags,
        help="what to do with [INST]/<<SYS>> tags inside chat messages",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout_s,
        help="seconds SIGTERM lets in-flight requests run; then streams end with an error event and [DONE]",
    )
    parser.add_argument("--device", default=d.device, help="torch device")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="weight dtype")
    parser.add_argument("--quantize", default=None, metavar="SCHEME", help=QUANTIZE_HELP)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile)")
    parser.add_argument("--log-level", default=d.log_level, help="uvicorn log level")


def config_from_args(ns: argparse.Namespace) -> ServeConfig:
    """The `ServeConfig` of parsed `add_arguments` options."""
    from llama2.assets import resolve_model

    if ns.api_key:
        print(
            "llama2 serve: warning: --api-key puts the key in the process list, where every local user "
            f"can read it; use --api-key-file or the environment variable {API_KEY_ENV}",
            file=sys.stderr,
        )
    env_keys = [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    hosts = None
    if ns.allowed_hosts is not None:
        hosts = tuple(h.strip() for h in ns.allowed_hosts.split(",") if h.strip())
        if not hosts:
            raise ConfigError("--allowed-hosts is empty; expected names like 'localhost,example.org' or '*'")
    if ns.read_timeout <= 0 or not math.isfinite(ns.read_timeout):
        raise ConfigError(f"--read-timeout must be a positive number of seconds, got {ns.read_timeout}")
    if ns.max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, got {ns.max_connections}")
    return ServeConfig(
        model_path=resolve_model(ns.model),
        tokenizer_path=ns.tokenizer,
        model_name=ns.model_name,
        host=ns.host,
        port=ns.port,
        api_keys=(*ns.api_key, *env_keys),
        api_key_file=ns.api_key_file,
        allowed_hosts=hosts,
        read_timeout_s=ns.read_timeout,
        max_connections=ns.max_connections,
        max_slots=ns.max_slots,
        max_seq_len=ns.max_seq_len,
        max_queue=ns.max_queue,
        prefill_chunk=ns.prefill_chunk,
        compile=ns.compile,
        max_body_bytes=ns.max_body_bytes,
        max_prompt_tokens=ns.max_prompt_tokens,
        chat_special_tags=ns.chat_special_tags,
        drain_timeout_s=ns.drain_timeout,
        device=ns.device,
        dtype=ns.dtype,
        quantize=ns.quantize,
        threads=ns.threads,
        log_level=ns.log_level,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m llama2.serve.server --model PATH ...`."""
    parser = argparse.ArgumentParser(prog="llama2 serve", description="OpenAI-compatible server")
    add_arguments(parser)
    run_server(config_from_args(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
