"""Loading and unloading mixtures at runtime: token-protected, a bad checkpoint refused with the
loader's error while the rest keep serving, an unloaded mixture gone from routing and stopped."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from helpers import add_tiny_tokenizer, load_base
from transformers import AutoTokenizer

from xlora import XLoraModel
from xlora.bases.sharing import shared_copy
from xlora.serve.app import create_app
from xlora.serve.engine import Engine

TOKEN = "s3cret-admin-token-0123"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def served(tiny_checkpoint):
    base_dir, ck = tiny_checkpoint
    add_tiny_tokenizer(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = load_base(base_dir)
    pristine = shared_copy(base)  # never wrapped: every loaded mixture copies it

    loaded = []

    def loader(path):
        loaded.append(Engine(XLoraModel.from_pretrained(shared_copy(pristine), path), tok))
        return loaded[-1]

    first = Engine(XLoraModel.from_pretrained(base, ck), tok)
    return create_app({"a": first}, admin_token=TOKEN, loader=loader), ck, loaded


def ask(http, model: str) -> int:
    return http.post("/v1/completions", json={"model": model, "prompt": "w1", "max_tokens": 2}).status_code


def test_load_and_unload_at_runtime(served, tmp_path):
    app, ck, loaded = served
    with TestClient(app) as http:
        body = {"name": "b", "checkpoint": str(ck)}
        assert http.post("/admin/mixtures", json=body).status_code == 401  # no token
        assert http.post("/admin/mixtures", json=body, headers={"authorization": "Bearer nope"}).status_code == 401
        r = http.post("/admin/mixtures", json=body, headers=AUTH)
        assert r.status_code == 200 and r.json()["loaded"] == "b"
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["a", "b"]
        assert ask(http, "b") == 200 and 'xlora_queue_depth{model="b"}' in http.get("/metrics").text
        assert http.post("/admin/mixtures", json=body, headers=AUTH).status_code == 409  # the name is taken
        (tmp_path / "junk").mkdir()
        bad = http.post("/admin/mixtures", json={"name": "c", "checkpoint": str(tmp_path / "junk")}, headers=AUTH)
        assert bad.status_code == 400 and "no xlora_config.json" in bad.json()["error"]["message"]
        assert ask(http, "a") == 200  # the others keep serving
        engine_b = loaded[0]
        assert http.delete("/admin/mixtures/b").status_code == 401
        assert http.delete("/admin/mixtures/b", headers=AUTH).status_code == 200
        assert ask(http, "b") == 404 and 'xlora_queue_depth{model="b"}' not in http.get("/metrics").text
        assert http.delete("/admin/mixtures/a", headers=AUTH).status_code == 409  # the last one stays
        for _ in range(100):  # it held no request: its engine stops at once
            if not engine_b.thread.is_alive():
                break
            time.sleep(0.05)
        assert not engine_b.thread.is_alive()


def test_admin_needs_a_real_token_and_a_loader(tiny_checkpoint):
    base_dir, ck = tiny_checkpoint
    add_tiny_tokenizer(base_dir)
    engine = Engine(XLoraModel.from_pretrained(load_base(base_dir), ck), AutoTokenizer.from_pretrained(base_dir))
    with pytest.raises(ValueError, match="admin token: expected at least 16 printable characters"):
        create_app(engine, "a", admin_token="short", loader=lambda p: engine)
    with pytest.raises(TypeError, match="the admin routes need a loader"):
        create_app(engine, "a", admin_token=TOKEN)
    with TestClient(create_app(engine, "a")) as http:  # no token: no admin routes at all
        assert http.post("/admin/mixtures", json={"name": "b", "checkpoint": str(ck)}).status_code == 404
    engine.shutdown()


def test_admin_checks_the_token_first_and_names_that_fit_a_url(served, tmp_path):
    app, ck, _ = served
    with TestClient(app) as http:
        assert http.post("/admin/mixtures", json={"nam": "c"}).status_code == 401  # not a 400 naming the fields
        bad = http.post("/admin/mixtures", json={"nam": "c"}, headers=AUTH)
        assert bad.status_code == 400 and "admin: expected" in bad.json()["error"]["message"]
        for name in ("x/y", "a\nb", "\u00e9\u202e", "a?b"):
            r = http.post("/admin/mixtures", json={"name": name, "checkpoint": str(ck)}, headers=AUTH)
            assert r.status_code == 400 and "printable characters" in r.json()["error"]["message"], (name, r.text)
        assert http.get("/v1/models/a").json()["id"] == "a"  # OpenAI's retrieve route
        assert http.get("/v1/models/zz").status_code == 404


def test_one_engine_under_two_ids_is_refused(tiny_checkpoint):
    base_dir, ck = tiny_checkpoint
    add_tiny_tokenizer(base_dir)
    engine = Engine(XLoraModel.from_pretrained(load_base(base_dir), ck), AutoTokenizer.from_pretrained(base_dir))
    with pytest.raises(ValueError, match="one Engine is mapped under two model ids"):
        create_app({"a": engine, "b": engine})
    with pytest.raises(ValueError, match="the mapping of model ids to engines is empty"):
        create_app({})
    engine.shutdown()
