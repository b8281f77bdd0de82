"""Prometheus metrics of the server (`GET /metrics`): queue depth, decoding rows, rows per decoding
step, time to first token, inter-token latency, tokens generated and answers by status code, each
labelled with the model id a client asks for (one per mixture)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xlora.serve.http import MODEL_KEY

# seconds: a CPU step of a small model is tens of milliseconds, a queued first token can take many seconds
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The metrics of one app, in their own registry (several apps in one process never collide);
    every series is labelled with the model id (one per mixture the app serves)."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model"]
        self.queue = Gauge("xlora_queue_depth", "Requests waiting for a batch", labels, registry=self.registry)
        self.rows = Gauge(
            "xlora_running_rows", "Rows of the running batch still decoding", labels, registry=self.registry
        )
        self.step_rows = Histogram(
            "xlora_step_rows", "Rows decoded per step", labels, buckets=ROW_BUCKETS, registry=self.registry
        )
        self.ttft = Histogram(
            "xlora_time_to_first_token_seconds",
            "From the request's arrival to its first token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "xlora_inter_token_latency_seconds",
            "Between two tokens of one answer",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter("xlora_generated_tokens", "Tokens generated", labels, registry=self.registry)
        self.answers = Counter(
            "xlora_requests", "Answers by HTTP status code", ["model", "status"], registry=self.registry
        )
        for name, engine in engines.items():
            self.add(name, engine)

    def add(self, name: str, engine: Any) -> None:
        """Report `engine`'s queue, rows and steps under the model id `name`."""
        self.queue.labels(name).set_function(lambda: len(engine.waiting))
        self.rows.labels(name).set_function(lambda: engine.busy_rows)
        engine.on_step = self.step_rows.labels(name).observe

    def remove(self, name: str) -> None:
        """Stop reporting the gauges of an unloaded mixture (its counters and histograms stay)."""
        for gauge in (self.queue, self.rows):
            try:
                gauge.remove(name)
            except KeyError:
                pass

    async def timed(self, events: AsyncIterator[Any], arrived: float, model: str) -> AsyncIterator[Any]:
        """`events` unchanged, observing the first token's delay and the gaps between tokens."""
        last = None
        ttft, itl, tokens = self.ttft.labels(model), self.itl.labels(model), self.tokens.labels(model)
        async for ev in events:
            if isinstance(ev, tuple) and ev and ev[0] == "token":
                now = time.monotonic()
                (ttft if last is None else itl).observe(now - (arrived if last is None else last))
                tokens.inc()
                last = now
            yield ev

    def count(self, status: int, model: str) -> None:
        self.answers.labels(model, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StatusCount:
    """ASGI middleware: hands the status of every answer on /v1/ to `count`, with the model id the
    request asked for (`scope[MODEL_KEY]`, set by the route; "" when the body never named one)."""

    def __init__(self, app: ASGIApp, count: Callable[[int, str], None]) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> Awaitable[None] | None:
            if message["type"] == "http.response.start":
                self.count(int(message["status"]), scope.get(MODEL_KEY, ""))
            return await send(message)

        await self.app(scope, receive, counting_send)
