"""The server's request checks: every bad input is a 400 (or 404/413) in OpenAI's error shape, never a 500."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_server import NAME, build_model
from transformers import AutoTokenizer

from xlora.serve.app import create_app
from xlora.serve.engine import Engine, MixtureOptions, Request

CHAT: dict[str, Any] = {"model": NAME, "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 2}
COMPLETION: dict[str, Any] = {"model": NAME, "prompt": "w1 w2", "max_tokens": 2}
CHAT_PATH, COMPLETION_PATH = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def model_tok(tiny):
    return build_model(tiny)


@pytest.fixture(scope="module")
def client(model_tok):
    model, tok = model_tok
    with TestClient(create_app(Engine(model, tok), NAME)) as http:
        yield http


def post(http: TestClient, path: str, body: dict[str, Any] | bytes, **kw):
    """POST `body` as JSON; Python's encoder writes NaN / Infinity, which the server's parser accepts."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=data, headers={"content-type": "application/json"}, **kw)


def error_of(r, status: int, *needles: str) -> dict[str, Any]:
    """The error object of `r`, checked: status, OpenAI's shape, and the message naming `needles`."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    for needle in needles:
        assert needle in err["message"], err
    return err


def with_xlora(ext: dict[str, Any]) -> dict[str, Any]:
    return {**CHAT, "xlora": ext}


# (path, request body, words the message must contain, the error's param)
UNSUPPORTED = [
    (CHAT_PATH, {**CHAT, "logit_bias": {"7": 5}}, "logit_bias"),
    (CHAT_PATH, {**CHAT, "n": 2}, "n"),
    (CHAT_PATH, {**CHAT, "logprobs": True}, "logprobs"),
    (CHAT_PATH, {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    (CHAT_PATH, {**CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    (CHAT_PATH, {**CHAT, "frequency_penalty": -1}, "frequency_penalty"),
    (CHAT_PATH, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT_PATH, {**CHAT, "tool_choice": "auto"}, "tool_choice"),
    (CHAT_PATH, {**CHAT, "functions": [{"name": "f"}]}, "functions"),
    (CHAT_PATH, {**CHAT, "function_call": "auto"}, "function_call"),
    (CHAT_PATH, {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT_PATH, {**CHAT, "modalities": ["text", "audio"]}, "modalities"),
    (CHAT_PATH, {**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (CHAT_PATH, {**CHAT, "reasoning_effort": "high"}, "reasoning_effort"),
    (CHAT_PATH, {**CHAT, "verbosity": "low"}, "verbosity"),
    (CHAT_PATH, {**CHAT, "web_search_options": {"search_context_size": "low"}}, "web_search_options"),
    (COMPLETION_PATH, {**COMPLETION, "best_of": 2}, "best_of"),
    (COMPLETION_PATH, {**COMPLETION, "echo": True}, "echo"),
    (COMPLETION_PATH, {**COMPLETION, "suffix": "w9"}, "suffix"),
    (COMPLETION_PATH, {**COMPLETION, "logprobs": 0}, "logprobs"),
    (COMPLETION_PATH, {**COMPLETION, "logit_bias": {"7": -100}}, "logit_bias"),
    (COMPLETION_PATH, {**COMPLETION, "n": 3}, "n"),
    (COMPLETION_PATH, {**COMPLETION, "presence_penalty": 1.0}, "presence_penalty"),
]


@pytest.mark.parametrize(
    "path,body,field", UNSUPPORTED, ids=[f"{'chat' if p == CHAT_PATH else 'completion'}-{f}" for p, _, f in UNSUPPORTED]
)
def test_unsupported_openai_fields_are_400(client, path, body, field):
    err = error_of(post(client, path, body), 400)
    assert err["message"].startswith(f"unsupported: {field}") and err["param"] == field


@pytest.mark.parametrize(
    "path,body,field",
    [
        (CHAT_PATH, {**CHAT, "max_token": 5}, "max_token"),  # a typo
        (CHAT_PATH, {**CHAT, "top_k": 5}, "top_k"),  # other servers' sampling knobs
        (CHAT_PATH, {**CHAT, "prompt": "w1"}, "prompt"),
        (COMPLETION_PATH, {**COMPLETION, "tools": []}, "tools"),  # a chat-only field
    ],
    ids=["chat-typo", "chat-top_k", "chat-prompt", "completion-tools"],
)
def test_unrecognized_fields_are_400(client, path, body, field):
    err = error_of(post(client, path, body), 400, "unrecognized request field", field)
    assert err["param"] == field


@pytest.mark.parametrize("field", ["mask_expert", "topk", "return_scaling", "global_scaling"])
def test_unknown_extension_fields_are_400(client, field):
    err = error_of(post(client, CHAT_PATH, with_xlora({field: 1})), 400, f"xlora.{field}", "unknown field")
    assert err["param"] == f"xlora.{field}"


def test_noop_values_and_harmless_fields_are_accepted(client):
    chat = {
        **CHAT,
        "n": 1,
        "logprobs": False,
        "top_logprobs": 0,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "functions": None,
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "w3", "name": None}, {"role": "user", "content": "w1"}],
    }
    r = post(client, CHAT_PATH, chat)
    assert r.status_code == 200, r.text
    completion = {
        **COMPLETION,
        "prompt": ["w1 w2"],
        "echo": False,
        "best_of": 1,
        "suffix": None,
        "logprobs": None,
        "user": "u1",
    }
    r = post(client, COMPLETION_PATH, completion)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text


@pytest.mark.parametrize("role", ["tool", "developer", "function", "bogus"])
def test_unknown_roles_are_400(client, role):
    body = {**CHAT, "messages": [{"role": role, "content": "w1"}]}
    error_of(post(client, CHAT_PATH, body), 400, "messages.0.role", "'system', 'user' or 'assistant'")


@pytest.mark.parametrize(
    "messages,needle",
    [
        ([], "messages"),
        ([{"role": "user", "content": "w1", "name": "bob"}], "unsupported: messages[0].name"),
        ([{"role": "user", "content": "w1"}, {"role": "assistant", "content": None}], "messages.1.content"),
        ([{"role": "user", "content": [{"type": "text", "text": "w1"}]}], "unsupported: messages[0].content"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls"),
        ([{"content": "w1"}], "messages.0.role"),
    ],
)
def test_bad_messages_are_400(client, messages, needle):
    error_of(post(client, CHAT_PATH, {**CHAT, "messages": messages}), 400, needle)


def test_a_template_that_refuses_the_messages_is_400(tiny, model_tok):
    model, _ = model_tok
    tok = AutoTokenizer.from_pretrained(tiny[0])
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant "
    )
    with TestClient(create_app(Engine(model, tok), NAME)) as http:
        body = {**CHAT, "messages": [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"}]}
        error_of(post(http, CHAT_PATH, body), 400, "chat template", "System role not supported")
        assert post(http, CHAT_PATH, CHAT).status_code == 200


NAN, INF = math.nan, math.inf
BAD_NUMBERS = [
    ({"xlora": {"global_scaling_weight": NAN}}, "xlora.global_scaling_weight"),
    ({"xlora": {"global_scaling_weight": INF}}, "xlora.global_scaling_weight"),
    ({"xlora": {"global_scaling_weight": -INF}}, "xlora.global_scaling_weight"),
    ({"xlora": {"global_scaling_weight": 1e308}}, "xlora.global_scaling_weight"),
    ({"xlora": {"global_scaling_weight": 10.5}}, "xlora.global_scaling_weight"),
    ({"xlora": {"global_scaling_weight": -11}}, "xlora.global_scaling_weight"),
    ({"xlora": {"global_scaling_weight": "1"}}, "xlora.global_scaling_weight"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 10**40}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": NAN}, "temperature"),
    ({"temperature": INF}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": NAN}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 10**30}, "context"),
    ({"xlora": {"top_k": 0}}, "xlora.top_k"),
    ({"xlora": {"top_k": -1}}, "xlora.top_k"),
    ({"xlora": {"top_k": 4}}, "xlora.top_k"),  # three experts
    ({"xlora": {"top_k": True}}, "xlora.top_k"),
    ({"xlora": {"mask_experts": ["nope"]}}, "unknown expert"),
    ({"xlora": {"mask_experts": ["chem", "Prot"]}}, "unknown expert"),
    ({"xlora": {"mask_experts": ["chem", "prot", "cot"]}}, "at least one expert"),
    ({"xlora": {"mask_experts": ["cot", "chem", "prot", "cot"]}}, "at least one expert"),
    ({"xlora": {"return_scalings": "all"}}, "xlora.return_scalings"),
    ({"stop": ["w1", "w2", "w3", "w4", "w5"]}, "stop"),
]


@pytest.mark.parametrize("change,needle", BAD_NUMBERS, ids=[json.dumps(c)[:60] for c, _ in BAD_NUMBERS])
def test_bad_values_are_400(client, change, needle):
    error_of(post(client, CHAT_PATH, {**CHAT, "temperature": 1.0, **change}), 400, needle)


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 2**63 - 1},
        {"seed": -(2**63)},
        {"seed": -1},
        {"xlora": {"global_scaling_weight": 10}},
        {"xlora": {"global_scaling_weight": -10.0}},
        {"xlora": {"global_scaling_weight": 0}},
        {"xlora": {"top_k": 3, "mask_experts": ["cot", "cot"]}},
        {"top_p": 1, "temperature": 0},
    ],
)
def test_values_at_the_bounds_are_accepted(client, change):
    r = post(client, CHAT_PATH, {**CHAT, "temperature": 1.0, **change})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


@pytest.mark.parametrize(
    "prompt,needle",
    [
        ("", "prompt: must not be empty"),
        ([], "unsupported: prompt"),
        (["w1", "w2"], "unsupported: prompt"),
        ([[7, 8]], "unsupported: prompt"),
        ([""], "prompt: must not be empty"),
        ("   ", "prompt: must not be empty"),
        (None, "prompt"),
    ],
)
def test_empty_or_unsupported_prompts_are_400(client, prompt, needle):
    error_of(post(client, COMPLETION_PATH, {**COMPLETION, "prompt": prompt}), 400, needle)


def test_other_errors_keep_openai_shape(client):
    assert error_of(post(client, CHAT_PATH, {**CHAT, "model": "other"}), 404, "not found")["type"] == "not_found_error"
    error_of(client.get("/v1/nowhere"), 404)
    error_of(client.get(CHAT_PATH), 405)
    error_of(post(client, CHAT_PATH, b"{not json"), 400)
    error_of(post(client, CHAT_PATH, b"[1, 2]"), 400)
    error_of(client.post(CHAT_PATH, content=b"model=x", headers={"content-type": "text/plain"}), 400)


def test_body_cap_is_413(model_tok):
    model, tok = model_tok
    cap = 4000
    with TestClient(create_app(Engine(model, tok), NAME, max_body_bytes=cap)) as http:
        pad = cap - len(json.dumps({**COMPLETION, "user": ""}).encode())
        exact = json.dumps({**COMPLETION, "user": "u" * pad}).encode()
        assert len(exact) == cap
        assert post(http, COMPLETION_PATH, exact).status_code == 200
        over = json.dumps({**COMPLETION, "user": "u" * (pad + 1)}).encode()
        err = error_of(post(http, COMPLETION_PATH, over), 413, str(cap))
        assert err["code"] == "request_too_large"

        def chunks():  # no Content-Length: the server counts what arrives
            yield over[:1000]
            yield over[1000:]

        r = http.post(COMPLETION_PATH, content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        error_of(r, 413, str(cap))
        assert http.get("/health").status_code == 200


class FailingTokenizer:
    """The real tokenizer, except that encoding raises: an internal fault, not the client's."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("tokenizer broke")


def test_internal_faults_are_500_in_openai_shape(model_tok):
    model, tok = model_tok
    app = create_app(Engine(model, FailingTokenizer(tok)), NAME)
    with TestClient(app, raise_server_exceptions=False) as http:
        assert error_of(post(http, CHAT_PATH, CHAT), 500)["type"] == "server_error"
        error_of(post(http, CHAT_PATH, {**CHAT, "n": 2}), 400, "unsupported: n")  # checks come first


@pytest.mark.parametrize(
    "bad",
    [
        Request(prompt_ids=[], max_tokens=2),
        Request(prompt_ids=[7], max_tokens=0),
        Request(prompt_ids=[7], max_tokens=2, temperature=math.nan),
        Request(prompt_ids=[7], max_tokens=2, top_p=0.0),
        Request(prompt_ids=[7], max_tokens=2, seed=2**64),
        Request(prompt_ids=[7], max_tokens=2, mixture=MixtureOptions(global_scaling_weight=math.inf)),
        Request(prompt_ids=[7], max_tokens=2, mixture=MixtureOptions(top_k=9)),
        Request(prompt_ids=[7], max_tokens=2, mixture=MixtureOptions(mask_experts=("chem", "prot", "cot"))),
    ],
)
def test_engine_refuses_a_request_that_would_fail_its_batch(model_tok, bad):
    model, tok = model_tok
    engine = Engine(model, tok)
    try:
        with pytest.raises(ValueError):
            engine.submit(bad)
        assert not engine.waiting
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "path, body, needle",
    [
        (CHAT_PATH, {**CHAT, "stream": "yes"}, "stream"),
        (CHAT_PATH, {**CHAT, "stream": 1}, "stream"),
        (CHAT_PATH, {**CHAT, "stop": ""}, "stop"),
        (CHAT_PATH, {**CHAT, "stop": ["x", ""]}, "stop"),
        (CHAT_PATH, {**CHAT, "messages": [{"role": "user", "content": ""}]}, "empty"),
        (
            CHAT_PATH,
            {**CHAT, "messages": [{"role": "system", "content": " "}, {"role": "user", "content": ""}]},
            "empty",
        ),
        (CHAT_PATH, {**CHAT, "messages": [{"role": "user", "content": "w1 \ud800 w2"}]}, "surrogate"),
        (COMPLETION_PATH, {**COMPLETION, "prompt": "w1 \udfff"}, "surrogate"),
        (COMPLETION_PATH, {**COMPLETION, "prompt": "   "}, "empty"),
    ],
)
def test_lenient_inputs_found_by_review_are_400(client, path, body, needle):
    error_of(post(client, path, body), 400, needle)


def test_a_tiny_temperature_samples_one_hot_and_never_fails_the_batch(client):
    greedy = post(client, CHAT_PATH, {**CHAT, "temperature": 0, "max_tokens": 4})
    tiny_t = post(client, CHAT_PATH, {**CHAT, "temperature": 1e-40, "seed": 1, "max_tokens": 4})
    assert greedy.status_code == tiny_t.status_code == 200, tiny_t.text
    assert tiny_t.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]


def test_stream_options_keys_are_checked(client):
    error_of(post(client, CHAT_PATH, {**CHAT, "stream_options": {"include_usgae": True}}), 400, "stream_options")
    ok = post(client, CHAT_PATH, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert ok.status_code == 200


JSON_BODY = json.dumps({**COMPLETION, "temperature": 0}).encode()  # greedy: leaves the global RNG alone


@pytest.mark.parametrize(
    "headers, content, needle",
    [
        ({"content-type": "text/plain"}, JSON_BODY, "got Content-Type: text/plain"),
        ({}, JSON_BODY, "no Content-Type was sent"),
        ({"content-type": "application/x-www-form-urlencoded"}, b"model=tiny-xlora&prompt=w1", "got Content-Type"),
        ({"content-type": "multipart/form-data; boundary=x"}, b"--x--", "got Content-Type: multipart/form-data"),
        ({"content-type": "application/json"}, b"", "the request body is empty"),
        ({"content-type": "application/json"}, b"[1, 2]", "got a JSON array"),
        ({"content-type": "application/json"}, b'"w1"', "got a JSON string"),
        ({"content-type": "application/json"}, b"{not json", "not valid JSON"),
    ],
    ids=["text-plain", "no-content-type", "form", "multipart", "empty", "array", "string", "invalid"],
)
def test_a_body_that_is_not_a_json_object_is_one_clear_line(client, headers, content, needle):
    """JSON must come as application/json (the decision is in xlora.serve.app); each case says what is wrong."""
    err = error_of(client.post(COMPLETION_PATH, content=content, headers=headers), 400, needle)
    assert "\n" not in err["message"] and "valid dictionary" not in err["message"] and err["param"] is None, err
    if needle != "not valid JSON":
        assert "JSON object (Content-Type: application/json)" in err["message"], err


def test_json_with_a_charset_or_a_json_suffix_is_accepted(client):
    for kind in ("application/json; charset=utf-8", "application/vnd.api+json"):
        r = client.post(COMPLETION_PATH, content=JSON_BODY, headers={"content-type": kind})
        assert r.status_code == 200, (kind, r.text)


@pytest.mark.parametrize(
    "path, body, message, param",
    [
        (CHAT_PATH, {"model": NAME}, "messages: field required", "messages"),
        (COMPLETION_PATH, {"prompt": "w1"}, "model: field required", "model"),
        (COMPLETION_PATH, {}, "model: field required; prompt: field required", "model"),
    ],
)
def test_missing_fields_are_named(client, path, body, message, param):
    err = error_of(post(client, path, body), 400)
    assert err["message"] == message and err["param"] == param, err


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'{"model": "x", "prompt": "\xff\xfe"}', "not valid UTF-8 (byte 0xff at position 26)"),
        (b'{"model": "x", "metadata": ' + b"[" * 100000 + b"]" * 100000 + b', "prompt": "w1"}', "nested too deeply"),
    ],
    ids=["not-utf8", "too-deep"],
)
def test_a_body_that_cannot_be_parsed_says_why(client, content, needle):
    headers = {"content-type": "application/json"}
    err = error_of(client.post(COMPLETION_PATH, content=content, headers=headers), 400, needle)
    assert "\n" not in err["message"], err
