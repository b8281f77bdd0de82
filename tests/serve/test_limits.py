"""Request timeouts and shutdown: a slow request ends with 504 and leaves the engine; a stopping
engine refuses new requests with 503 + Retry-After and ends waiting ones with an error."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from test_server import NAME, build_model

from xlora.serve.app import create_app
from xlora.serve.engine import SHUTDOWN_MESSAGE, Engine
from xlora.serve.engine import Request as GenRequest


def test_a_request_past_its_timeout_gets_504_and_leaves_the_engine(tiny):
    model, tok = build_model(tiny)
    engine = Engine(model, tok, max_batch=2)
    slow = tok.decode

    def slower(*args, **kwargs):  # 50 ms per token: even an answer that stops at EOS after 3 tokens is late
        time.sleep(0.05)
        return slow(*args, **kwargs)

    tok.decode = slower
    with TestClient(create_app(engine, NAME, request_timeout_s=0.1)) as http:
        t0 = time.monotonic()
        body = {"model": NAME, "prompt": "w1", "max_tokens": 200}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 504 and "request timeout" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 3.0
        for _ in range(100):  # the row leaves at the next step
            if engine.busy_rows == 0:
                break
            time.sleep(0.02)
        assert engine.busy_rows == 0
        stream = http.post("/v1/completions", json={**body, "stream": True})
        assert "request timeout" in stream.text and "[DONE]" not in stream.text
    tok.decode = slow


def test_shutdown_refuses_new_requests_and_ends_waiting_ones(tiny):
    model, tok = build_model(tiny)
    engine = Engine(model, tok)
    time.sleep(0.2)  # the scheduler is now asleep on its condition, woken only by a notify
    waiting = GenRequest(prompt_ids=[6], max_tokens=1)
    events: list = []
    waiting.emit = events.append
    with engine.cond:
        engine.waiting.append(waiting)  # queued without a notify: still waiting when shutdown comes
    engine.shutdown()
    assert events == [("error", SHUTDOWN_MESSAGE)]  # ended with a reason, never left hanging
    assert not engine.thread.is_alive()
    with TestClient(create_app(engine, NAME)) as http:
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "w1", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_a_request_cancelled_while_its_batch_forms_never_kills_the_scheduler(tiny):
    """Cancel removes a waiting request while the scheduler waits for more to join its batch."""
    model, tok = build_model(tiny)
    engine = Engine(model, tok, max_batch=4, batch_wait_ms=200)
    for _ in range(3):
        doomed = GenRequest(prompt_ids=[6], max_tokens=2)
        engine.submit(doomed)
        time.sleep(0.05)  # the scheduler now waits for more requests to join
        engine.cancel(doomed)
        time.sleep(0.3)
    assert engine.thread.is_alive()
    events: list = []
    alive = GenRequest(prompt_ids=[6], max_tokens=2)
    alive.emit = events.append
    engine.submit(alive)
    for _ in range(200):
        if events and events[-1][0] == "end":
            break
        time.sleep(0.02)
    assert events and events[-1][0] == "end"  # the next request is still answered
    engine.shutdown()


def test_the_engine_checks_its_arguments_and_each_request(tiny):
    model, tok = build_model(tiny)
    with pytest.raises(TypeError, match="Engine: model: expected an XLoraModel, got NoneType"):
        Engine(None, tok)
    with pytest.raises(TypeError, match="Engine: tokenizer: expected a transformers tokenizer, got NoneType"):
        Engine(model, None)
    engine = Engine(model, tok)
    with pytest.raises(TypeError, match="Engine.submit: expected an xlora.serve.engine.Request, got str"):
        engine.submit("hi")
    for bad, message in (
        (dict(prompt_ids=[1.5]), "token id 1.5 is not an integer"),
        (dict(prompt_ids=[99999]), "token id 99999 is not an integer in 0..127"),
        (dict(prompt_ids=[5] * 500, max_tokens=100), "500 prompt tokens \\+ max_tokens 100 exceed the context of 512"),
        (dict(max_tokens="3"), "max_tokens must be an integer >= 1, got '3'"),
        (dict(temperature="hot"), "temperature must be a finite number >= 0, got 'hot'"),
    ):
        with pytest.raises(ValueError, match=message):
            engine.submit(GenRequest(**{"prompt_ids": [5], "max_tokens": 2, **bad}))
    engine.shutdown()
