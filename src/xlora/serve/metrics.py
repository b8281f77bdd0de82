"""Prometheus metrics of the server (`GET /metrics`): queue depth, decoding rows, rows per decoding
step, time to first token, inter-token latency, tokens generated and answers by status code, each
labelled with the model id a client asks for (one per mixture)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# seconds: a CPU step of a small model is tens of milliseconds, a queued first token can take many seconds
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The metrics of one app, in their own registry (several apps in one process never collide)."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model_name
        labels = ["model"]
        queue = Gauge("xlora_queue_depth", "Requests waiting for a batch", labels, registry=self.registry)
        queue.labels(model_name).set_function(lambda: len(engine.waiting))
        rows = Gauge("xlora_running_rows", "Rows of the running batch still decoding", labels, registry=self.registry)
        rows.labels(model_name).set_function(lambda: engine.busy_rows)
        self.step_rows = Histogram(
            "xlora_step_rows", "Rows decoded per step", labels, buckets=ROW_BUCKETS, registry=self.registry
        ).labels(model_name)
        self.ttft = Histogram(
            "xlora_time_to_first_token_seconds",
            "From the request's arrival to its first token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.itl = Histogram(
            "xlora_inter_token_latency_seconds",
            "Between two tokens of one answer",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.tokens = Counter("xlora_generated_tokens", "Tokens generated", labels, registry=self.registry).labels(
            model_name
        )
        self.answers = Counter(
            "xlora_requests", "Answers by HTTP status code", ["model", "status"], registry=self.registry
        )
        engine.on_step = self.step_rows.observe

    async def timed(self, events: AsyncIterator[Any], arrived: float) -> AsyncIterator[Any]:
        """`events` unchanged, observing the first token's delay and the gaps between tokens."""
        last = None
        async for ev in events:
            if isinstance(ev, tuple) and ev and ev[0] == "token":
                now = time.monotonic()
                (self.ttft if last is None else self.itl).observe(now - (arrived if last is None else last))
                self.tokens.inc()
                last = now
            yield ev

    def count(self, status: int) -> None:
        self.answers.labels(self.model, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StatusCount:
    """ASGI middleware: hands the status of every answer on /v1/ to `count` (the metrics' answers by status)."""

    def __init__(self, app: ASGIApp, count: Callable[[int], None]) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> Awaitable[None] | None:
            if message["type"] == "http.response.start":
                self.count(int(message["status"]))
            return await send(message)

        await self.app(scope, receive, counting_send)
