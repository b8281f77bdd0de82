"""A client that leaves stops its work at once, streaming or not, decoding or still waiting (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from test_server import NAME, build_model, serve

from xlora.serve.app import create_app
from xlora.serve.engine import Engine

STEP_S = 0.04  # added to each decoding step: 250 tokens take over 10 s on any machine
BOUND_S = 3.0  # generous for "at the next step", far under what the decode would take


class SlowDecode:
    """The real tokenizer, but `decode` (called once per row at every decoding step) waits STEP_S first."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def decode(self, *args, **kwargs):
        time.sleep(STEP_S)
        return self._tok.decode(*args, **kwargs)


class Recorder:
    """ASGI wrapper recording each response's status and each exception the app raised (uvicorn logs
    those as 'Exception in ASGI application' with a traceback)."""

    def __init__(self, app) -> None:
        self.app, self.statuses, self.raised = app, [], []

    async def __call__(self, scope, receive, send) -> None:
        async def record(message) -> None:
            if message["type"] == "http.response.start":
                self.statuses.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        except Exception as e:
            self.raised.append(e)
            raise


@pytest.fixture(scope="module")
def slow_server(tiny):
    """(engine, port, recorder): one batch row, so a second request waits while the first decodes."""
    model, tok = build_model(tiny)
    engine = Engine(model, SlowDecode(tok), max_batch=1, max_queue=4)
    recorder = Recorder(create_app(engine, NAME))
    with serve(recorder) as port:
        yield engine, port, recorder


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` every 10 ms; whether it held within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def send_request(port: int, body: dict[str, Any]) -> socket.socket:
    """POST `body` to /v1/completions over a raw socket, and return the socket unread (the client may just leave)."""
    data = json.dumps(body).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + data)
    return sock


def long_request(stream: bool) -> dict[str, Any]:
    """A greedy completion of 250 tokens (the tiny model emits no EOS on this prompt)."""
    return {"model": NAME, "prompt": "w1", "max_tokens": 250, "temperature": 0, "stream": stream}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_leaves_stops_decoding_at_once(slow_server, stream):
    """The report: a non-streaming request whose socket closed 0.5 s in kept decoding to the end."""
    engine, port, _ = slow_server
    before = engine.cancelled_rows
    sock = send_request(port, long_request(stream))
    assert wait_until(lambda: engine.busy_rows == 1, 30)
    time.sleep(0.5)
    assert engine.busy_rows == 1  # still decoding: the whole answer takes over 10 s
    sock.close()
    assert wait_until(lambda: engine.busy_rows == 0, BOUND_S), "the row kept decoding after its client left"
    assert engine.cancelled_rows == before + 1  # cancelled, not finished


def test_a_waiting_client_that_leaves_frees_its_slot_without_an_error(slow_server):
    """The report: a queued non-streaming request whose client left was a 500 (StopAsyncIteration) with a
    traceback, and its queue slot stayed taken until the batch before it ended."""
    engine, port, recorder = slow_server
    seen = len(recorder.statuses)
    first = send_request(port, long_request(False))
    assert wait_until(lambda: engine.busy_rows == 1, 30)
    second = send_request(port, long_request(False))
    assert wait_until(lambda: len(engine.waiting) == 1, 30)
    second.close()
    assert wait_until(lambda: len(recorder.statuses) == seen + 1, BOUND_S), "no answer to the request that left"
    assert recorder.statuses[seen] != 500 and not recorder.raised, (recorder.statuses, recorder.raised)
    assert not engine.waiting, "the queue slot stayed taken"
    assert engine.busy_rows == 1  # freed while the first request still decodes
    first.close()
    assert wait_until(lambda: engine.busy_rows == 0, BOUND_S)
    assert wait_until(lambda: len(recorder.statuses) == seen + 2, BOUND_S), recorder.statuses
    assert 500 not in recorder.statuses[seen:] and not recorder.raised, (recorder.statuses, recorder.raised)
