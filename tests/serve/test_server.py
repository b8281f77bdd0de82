"""The OpenAI-compatible server, exercised with the real `openai` client on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from helpers import add_tiny_tokenizer, load_base
from transformers import AutoTokenizer

from xlora import XLoraConfig, XLoraModel
from xlora.serve.app import DEFAULT_MAX_BODY_BYTES, create_app
from xlora.serve.engine import Engine

NAME = "tiny-xlora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(tiny) -> tuple[XLoraModel, object]:
    """The tiny X-LoRA model (experts chem, prot, cot) with a sharp classifier, and its tokenizer."""
    base_dir, experts = tiny
    add_tiny_tokenizer(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(5)
    model = XLoraModel.from_experts(
        load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True)
    )
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)
    return model, tok


@contextmanager
def serve(app) -> Iterator[int]:
    """Run `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tiny):
    model, tok = build_model(tiny)
    engine = Engine(model, tok, max_batch=8, max_queue=64)
    with serve(create_app(engine, NAME)) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        yield client, model, tok, port


def reference_answer(model, tok, content: str, max_tokens: int) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id, pad_token_id=0)
    new = [t for t in out[0, ids.shape[1] :].tolist() if t != tok.eos_token_id and t != 0]
    return tok.decode(new, skip_special_tokens=True)


def test_models_and_health(served):
    client, _, _, port = served
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(f"http://127.0.0.1:{port}/health").json()
    assert health["status"] == "ok" and health["base"] == {"dtype": "float32", "quantization": "none"}
    assert client.models.list().data[0].model_extra["base"] == health["base"]


def test_chat_greedy_equals_library(served):
    client, model, tok, _ = served
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "w3 w4 w5"}], max_tokens=12, temperature=0
    )
    assert r.choices[0].message.content == reference_answer(model, tok, "w3 w4 w5", 12)
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_concatenates_to_the_answer(served):
    client, *_ = served
    msgs = [{"role": "user", "content": "w7 w8"}]
    full = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # incremental
    assert "".join(pieces) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_and_stop(served):
    client, *_ = served
    r = client.completions.create(model=NAME, prompt="w1 w2 w3", max_tokens=8, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    words = text.split()
    assert len(words) >= 3, text
    cut = client.completions.create(model=NAME, prompt="w1 w2 w3", max_tokens=8, temperature=0, stop=[words[2]])
    assert cut.choices[0].text == text[: text.index(words[2])] and cut.choices[0].finish_reason == "stop"


def test_sampling_seeded(served):
    client, *_ = served
    kw = dict(model=NAME, messages=[{"role": "user", "content": "w9"}], max_tokens=10, temperature=1.5, top_p=0.95)
    a = client.chat.completions.create(seed=3, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=3, **kw).choices[0].message.content
    others = {client.chat.completions.create(seed=k, **kw).choices[0].message.content for k in (4, 5, 6)}
    greedy = client.chat.completions.create(**{**kw, "temperature": 0}).choices[0].message.content
    assert a == b  # the seed is honoured
    assert others - {a} and (others | {a}) - {greedy}  # and it really samples (not greedy, not fixed)


def test_scalings_extension(served):
    client, model, *_ = served
    msgs = [{"role": "user", "content": "w5 w6"}]
    r = client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=6, temperature=0, extra_body={"xlora": {"return_scalings": "summary"}}
    )
    summary = r.model_extra["xlora"]["summary"]
    assert list(summary) == model.expert_names and abs(sum(summary.values()) - 1) < 1e-4
    r = client.chat.completions.create(
        model=NAME,
        messages=msgs,
        max_tokens=6,
        temperature=0,
        extra_body={"xlora": {"return_scalings": "tokens", "mask_experts": ["prot"]}},
    )
    tokens = r.model_extra["xlora"]["tokens"]
    assert len(tokens) == r.usage.completion_tokens
    assert all(t["weights"]["prot"] == 0 for t in tokens)
    plain = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0)
    assert "xlora" not in (plain.model_extra or {})
    assert model._expert_mask is None  # the request's mask did not stay on the model


def test_errors(served):
    client, _, _, port = served
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "w1"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt=" ".join(["w1"] * 600), max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w1"}], n=2)
    with pytest.raises(openai.BadRequestError, match="unknown expert"):
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "w1"}], extra_body={"xlora": {"mask_experts": ["nope"]}}
        )
    raw = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400 and "message" in raw.json()["error"]
    raw = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": NAME, "messages": "hi"})
    assert raw.status_code == 400 and "messages" in raw.json()["error"]["message"]


def test_queue_bound_gives_429(tiny):
    model, tok = build_model(tiny)  # its own model: the served one has its engine
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    time.sleep(0.2)  # the scheduler sleeps on its condition until a notify
    from xlora.serve.engine import Request

    with engine.cond:  # the queue is full, and nothing wakes the scheduler to drain it
        engine.waiting.append(Request(prompt_ids=[6], max_tokens=1))
    with TestClient(create_app(engine, NAME)) as http:
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "w1", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "1"  # back-pressure a client library can act on


def test_disconnect_frees_the_row(served):
    _, _, _, port = served
    before = httpx.get(f"http://127.0.0.1:{port}/health").json()["cancelled"]
    with httpx.stream(
        "POST",
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": NAME, "prompt": "w1", "max_tokens": 400, "stream": True},
    ) as r:
        for _ in zip(range(3), r.iter_lines()):
            pass
    deadline = time.time() + 20
    while time.time() < deadline:
        h = httpx.get(f"http://127.0.0.1:{port}/health").json()
        if h["decoding"] == 0 and h["waiting"] == 0:
            break
        time.sleep(0.1)
    assert h["decoding"] == 0 and h["cancelled"] == before + 1  # stopped early, not run to 400 tokens


def test_load_50_concurrent_streams(served):
    client, _, _, port = served

    def one(i: int) -> int:
        stream = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"w{i % 90}"}], max_tokens=8, temperature=0, stream=True
        )
        return sum(1 for c in stream if c.choices and c.choices[0].delta.content)

    with ThreadPoolExecutor(max_workers=50) as pool:
        counts = list(pool.map(one, range(50), timeout=120))
    assert len(counts) == 50 and all(c >= 1 for c in counts)
    assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"


class SlowTokenizer:
    """The real tokenizer with a fixed delay before each encoding, so that preparing a request takes
    seconds on any machine; `busy` is set while it encodes."""

    def __init__(self, tok, delay_s: float) -> None:
        self._tok, self.delay_s, self.busy = tok, delay_s, threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        self.busy.set()
        try:
            time.sleep(self.delay_s)
            return self._tok(*args, **kwargs)
        finally:
            self.busy.clear()


def test_preparation_does_not_block_the_event_loop(served):
    """/health answers quickly while a large prompt (under the body cap) is templated and tokenised.
    Preparing it takes over 3 s (a fixed 3 s delay plus the real tokenisation); on the event loop, a
    probe sent meanwhile would wait for all of that, so a 1.5 s bound is generous yet decisive."""
    _, model, tok, _ = served
    slow = SlowTokenizer(tok, delay_s=3.0)
    words = " ".join(f"w{i % 100}" for i in range(250_000))
    body = {"model": NAME, "messages": [{"role": "user", "content": words}], "max_tokens": 2}
    assert 900_000 < len(json.dumps(body)) < DEFAULT_MAX_BODY_BYTES
    with serve(create_app(Engine(model, slow), NAME)) as port, ThreadPoolExecutor(1) as pool:
        url = f"http://127.0.0.1:{port}"
        answer = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=120)
        assert slow.busy.wait(timeout=60)
        latencies = []
        while slow.busy.is_set():
            start = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=60).status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
        r = answer.result(timeout=120)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]  # prepared in full, then refused
    assert latencies and max(latencies) < 1.5, latencies


def test_default_body_cap_is_413_over_http(served):
    _, _, _, port = served
    body = {"model": NAME, "prompt": "w1 " * 700_000, "max_tokens": 2}  # 2.1 MB
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "request_too_large"
    assert str(DEFAULT_MAX_BODY_BYTES) in err["message"]
    assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"  # the server carries on
