"""The server's engine: `generation.engine.StepEngine` driven by one background thread, with
thread-safe inboxes for new sequences and cancellations and asyncio queues towards the handlers.

Each loop turn takes new sequences and cancellations (freeing cancelled slots), runs one
`StepEngine.step` and hands the step's items to the event loop with one `call_soon_threadsafe` per
loop. The queue limit is `policy.queue_has_room`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from llama2.errors import EngineClosedError as EngineClosedError  # defined in errors.py; re-exported
from llama2.errors import EngineOverloadedError as EngineOverloadedError
from llama2.generation.engine import (
    EngineConfig,
    EngineItem,
    EngineSequence,
    Outbox,
    SequenceFailed,
    SequenceSpec,
    StepEngine,
)
from llama2.scheduling import queue_has_room

if TYPE_CHECKING:
    from llama2.model import Transformer
    from llama2.serve.metrics import ServeMetrics
    from llama2.tokenizer import Tokenizer

log = logging.getLogger("llama2.serve")

QueueItem = EngineItem


class RequestHandle:
    """The asyncio side of one request: a queue of `QueueItem`s for all of its sequences."""

    def __init__(
        self, engine: Engine, loop: asyncio.AbstractEventLoop, specs: Sequence[SequenceSpec]
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.specs = list(specs)
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue()
        self.cancelled = False

    def cancel(self) -> None:
        """Cancel every unfinished sequence of this request; their slots are freed at the next step."""
        if not self.cancelled:
            self.cancelled = True
            self.engine.cancel(self)


class Engine(StepEngine):
    """Continuous batching in a background thread over the step engine.

    Example:
        >>> engine = Engine(model, tokenizer, EngineConfig(max_slots=8))
        >>> engine.start()
        >>> handle = engine.submit([SequenceSpec(prompt, 32)], asyncio.get_running_loop())
        >>> item = await handle.queue.get()   # TokenEvent ... then SequenceDone
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        metrics: ServeMetrics | None = None,
    ) -> None:
        """Allocate the engine (see `StepEngine`) and bind the metrics' state gauges."""
        super().__init__(model, tokenizer, config, metrics)
        self.metrics: ServeMetrics | None = metrics
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: list[EngineSequence] = []
        self._cancel_requests: list[RequestHandle] = []
        self._n_queued = 0  # incoming + waiting (read by submit on the event-loop thread)
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        n = self.config.max_slots
        if metrics is not None:
            metrics.bind_engine(
                {
                    "waiting": lambda: float(self._n_queued),
                    "running": lambda: float(len(self._running)),
                    "slots_used": lambda: float(n - len(self._free_slots)),
                    "slots_total": lambda: float(n),
                    "tokens_used": lambda: float(sum(s.pos for s in list(self._running))),
                    "usage": lambda: (n - len(self._free_slots)) / n,
                }
            )

    # ------------------------------------------------------------------ thread-safe public API
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llama2-engine", daemon=True)
            self._thread.start()

    def submit(self, specs: Sequence[SequenceSpec], loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Queue the sequences of one request (all or none).

        Args:
            specs: the sequences; their prompts and limits must already be validated.
            loop: the event loop whose queue receives the items.

        Returns:
            The request's handle; its queue gets `TokenEvent`s and one `SequenceDone` or
            `SequenceFailed` per sequence.

        Raises:
            EngineClosedError: the engine is shutting down.
            EngineOverloadedError: accepting these sequences would exceed `max_queue`.
            GenerationError: a spec is invalid (empty prompt, id out of range, too long).
        """
        handle = RequestHandle(self, loop, specs)
        seqs = [self.new_sequence(handle, i, spec) for i, spec in enumerate(specs)]
        with self._lock:
            if not self._accepting:
                raise EngineClosedError("the server is shutting down; retry on another instance")
            if not queue_has_room(self._n_queued, len(seqs), self.config.max_queue, len(self._free_slots)):
                raise EngineOverloadedError(
                    f"the request queue is full ({self._n_queued} sequences waiting, limit "
                    f"{self.config.max_queue}); retry later"
                )
            self._n_queued += len(seqs)
            self._incoming.extend(seqs)
        self._wake.set()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Cancel a request's sequences; the engine frees their slots at its next step."""
        with self._lock:
            self._cancel_requests.append(handle)
        self._wake.set()

    def stats(self) -> dict[str, int]:
        """Current counts: waiting, running, free slots, cache positions in use."""
        running = list(self._running)
        return {
            "waiting": self._n_queued,
            "running": len(running),
            "free_slots": len(self._free_slots),
            "cache_tokens": sum(s.pos for s in running),
        }

    def idle(self) -> bool:
        with self._lock:
            return self._n_queued == 0 and not self._running

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop taking sequences, let live ones finish (up to `drain_timeout` s), then stop the thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while not self.idle() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        # Anything left (drain timed out) is failed so that no handler waits forever.
        out: Outbox = []
        with self._lock:
            leftover = [*self._incoming, *self._waiting, *self._running]
            self._incoming.clear()
            self._waiting.clear()
            self._running = []
            self._n_queued = 0
        for seq in leftover:
            if not seq.finished:
                seq.finished = True
                failed = SequenceFailed(seq.index, "the server shut down before this finished")
                out.append((seq.owner, failed))
        self._deliver(out)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while True:
                self._wake.clear()
                try:
                    self._take_commands()
                except Exception:  # never let the engine thread die: handlers would wait forever
                    log.exception("engine bookkeeping failed")
                if self._stop:
                    return
                if not self.has_work():
                    self._wake.wait(0.5)
                    continue
                t0 = time.monotonic()
                try:
                    self._step()
                except Exception as e:  # a batched forward failed: fail the live sequences, keep serving
                    log.exception("engine step failed")
                    self._deliver(self.fail_all(f"internal error in the model step: {type(e).__name__}: {e}"))
                self.steps += 1
                if self.metrics is not None:
                    self.metrics.step_time.observe(time.monotonic() - t0)

    def _step(self) -> None:
        self._deliver(self.step())

    def _on_admitted(self, seq: EngineSequence) -> None:
        with self._lock:
            self._n_queued -= 1

    def _take_commands(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancels, self._cancel_requests = self._cancel_requests, []
        self.add(incoming)
        if cancels:
            dropped = self.drop({id(h) for h in cancels})
            with self._lock:
                self._n_queued -= dropped

    # ------------------------------------------------------------------ delivery
    @staticmethod
    def _deliver(items: Outbox) -> None:
        """Hand a step's items to their event loops (one thread-safe callback per loop)."""
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list[tuple[RequestHandle, QueueItem]]]] = {}
        for owner, item in items:
            if not isinstance(owner, RequestHandle) or owner.cancelled:
                continue
            by_loop.setdefault(id(owner.loop), (owner.loop, []))[1].append((owner, item))
        for loop, batch in by_loop.values():
            with contextlib.suppress(RuntimeError):  # the loop is closed (server stopping)
                loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[RequestHandle, QueueItem]]) -> None:
    for handle, item in batch:
        handle.queue.put_nowait(item)
