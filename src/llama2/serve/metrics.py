"""Prometheus text-format metrics written by hand: counters, gauges and histograms, thread-safe.

The engine thread records into them and `GET /metrics` renders them (text exposition format 0.0.4).
Gauges may be backed by a callback so that they always show the engine's current state.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

Labels = tuple[tuple[str, str], ...]
M = TypeVar("M", bound="_Metric")

# Latency buckets in seconds (time to first token, request latency, step time).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _label_text(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    body = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), "")}"'
        for k, v in items
    )
    return "{" + body + "}"


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self._lock = threading.Lock()

    def samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self.samples()]
        return "\n".join(lines)


class Counter(_Metric):
    """A monotonically increasing value per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Adds `amount` (>= 0) to the counter of the given labels."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items()) or [((), 0.0)]
        return [f"{self.name}{_label_text(k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down; either set explicitly or read from a callback at render time."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, fn: Callable[[], float] | None = None) -> None:
        super().__init__(name, help_text)
        self._value = 0.0
        self._fn = fn

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value

    def value(self) -> float:
        if self._fn is not None:
            return float(self._fn())
        with self._lock:
            return self._value

    def samples(self) -> list[str]:
        return [f"{self.name} {_fmt(self.value())}"]


class Histogram(_Metric):
    """Cumulative buckets, sum and count (Prometheus histogram)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last one: +Inf
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            self._count += 1
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
                    return
            self._counts[-1] += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def samples(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        out: list[str] = []
        cumulative = 0
        for bound, c in zip((*self.buckets, math.inf), counts, strict=True):
            cumulative += c
            out.append(f"{self.name}_bucket{_label_text((), (('le', _fmt(bound)),))} {cumulative}")
        out.append(f"{self.name}_sum {_fmt(total)}")
        out.append(f"{self.name}_count {n}")
        return out


class RateWindow:
    """Events per second over a sliding window (for the tokens/s gauge)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, n: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append((now, n))
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._events) / self.window_s

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()


class Registry:
    """An ordered collection of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: M) -> M:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        return "\n".join(m.render() for m in self._metrics) + "\n"


class ServeMetrics:
    """The server's metrics. Gauges about the engine's state are callbacks set by `bind_engine`."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self._state: dict[str, Callable[[], float]] = {}
        self.generated_rate = RateWindow(10.0)

        def state(key: str) -> Callable[[], float]:
            return lambda: self._state[key]() if key in self._state else 0.0

        self.queue_depth = r.add(
            Gauge("llama2_queue_depth", "Sequences waiting for a KV cache slot.", state("waiting"))
        )
        self.running = r.add(
            Gauge("llama2_running_sequences", "Sequences holding a KV cache slot.", state("running"))
        )
        self.cache_slots_used = r.add(
            Gauge("llama2_kv_cache_slots_used", "KV cache slots allocated to sequences.", state("slots_used"))
        )
        self.cache_slots_total = r.add(
            Gauge("llama2_kv_cache_slots_total", "KV cache slots in the fixed budget.", state("slots_total"))
        )
        self.cache_tokens_used = r.add(
            Gauge(
                "llama2_kv_cache_tokens_used",
                "Cache positions written by live sequences.",
                state("tokens_used"),
            )
        )
        self.cache_usage = r.add(
            Gauge("llama2_kv_cache_usage_ratio", "Allocated slots / total slots.", state("usage"))
        )
        self.tokens_per_second = r.add(
            Gauge(
                "llama2_generation_tokens_per_second",
                "Generated tokens per second over the last 10 s.",
                lambda: self.generated_rate.rate(),
            )
        )
        self.requests = r.add(Counter("llama2_requests_total", "HTTP requests by endpoint and status code."))
        self.prompt_tokens = r.add(Counter("llama2_prompt_tokens_total", "Prompt tokens prefilled."))
        self.generation_tokens = r.add(Counter("llama2_generation_tokens_total", "Tokens generated."))
        self.sequences_finished = r.add(
            Counter(
                "llama2_sequences_finished_total",
                "Sequences ended, by reason (stop, length, cancelled, error).",
            )
        )
        self.ttft = r.add(
            Histogram(
                "llama2_time_to_first_token_seconds", "Time from submission to a sequence's first token."
            )
        )
        self.request_latency = r.add(
            Histogram("llama2_request_latency_seconds", "Time from request arrival to its last byte.")
        )
        self.step_time = r.add(Histogram("llama2_engine_step_seconds", "Duration of one engine step."))

    def bind_engine(self, getters: dict[str, Callable[[], float]]) -> None:
        """Sets the callbacks behind the state gauges (keys: waiting, running, slots_used, slots_total,
        tokens_used, usage)."""
        self._state.update(getters)

    def render(self) -> str:
        return self.registry.render()
