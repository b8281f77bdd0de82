"""The Engine and create_app refuse options that cannot work, at construction, with one line naming the option."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient
from test_server import NAME, build_model

from xlora.serve.app import create_app
from xlora.serve.engine import Engine


@pytest.fixture(scope="module")
def model_tok(tiny):
    return build_model(tiny)  # the tiny Llama's context is 512


@pytest.mark.parametrize(
    "option, value",
    [
        ("reuse_scalings_after", 0),  # the report: the server started, then every request was a 500
        ("reuse_scalings_after", -2),
        ("reuse_scalings_after", 1.5),
        ("max_batch", 0),
        ("max_batch", True),
        ("max_batch", 2.0),
        ("max_queue", 0),
        ("max_queue", None),
        ("batch_wait_ms", -1),
        ("batch_wait_ms", math.nan),
        ("batch_wait_ms", math.inf),
        ("batch_wait_ms", 1e300),  # a Condition.wait of 1e297 s overflows and kills the scheduler
        ("context_length", 1),
        ("context_length", 513),  # past the model's positions it produces garbage
        ("context_length", 64.0),
    ],
)
def test_engine_refuses_bad_options(model_tok, option, value):
    model, tok = model_tok
    with pytest.raises(ValueError) as caught:
        Engine(model, tok, **{option: value})
    message = str(caught.value)
    assert message.startswith(f"Engine: {option}: expected ") and f"got {value!r}" in message and "\n" not in message


def test_engine_accepts_options_at_their_bounds(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=1, max_queue=1, batch_wait_ms=0, reuse_scalings_after=1, context_length=512)
    engine.shutdown()
    assert engine.context_length == 512


def test_a_smaller_context_length_bounds_requests(model_tok):
    model, tok = model_tok
    with TestClient(create_app(Engine(model, tok, context_length=16), NAME)) as http:
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "w1 w2", "max_tokens": 20})
        assert r.status_code == 400 and "the context holds 16" in r.json()["error"]["message"], r.text
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "w1 w2", "max_tokens": 4})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"model_name": ""}, "create_app: model_name: expected a non-empty name"),
        ({"model_name": "   "}, "create_app: model_name: expected a non-empty name"),
        ({"model_name": " tiny"}, "without surrounding spaces"),
        ({"model_name": None}, "create_app: model_name"),
        ({"max_body_bytes": 0}, "create_app: max_body_bytes: expected an integer >= 1024"),
        ({"max_body_bytes": 100}, "create_app: max_body_bytes"),
        ({"max_body_bytes": 2**31}, "<= 1073741824"),
        ({"max_body_bytes": 4096.0}, "create_app: max_body_bytes"),
    ],
)
def test_create_app_refuses_bad_options(model_tok, kwargs, needle):
    model, tok = model_tok
    engine = Engine(model, tok)
    try:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
            create_app(engine, **{"model_name": NAME, **kwargs})
    finally:
        engine.shutdown()


def test_create_app_needs_an_engine():
    with pytest.raises(
        TypeError,
        match="create_app: engine: expected an xlora.serve.engine.Engine or a mapping of model ids to them, got str",
    ):
        create_app("engine", NAME)
