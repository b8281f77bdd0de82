"""GET /metrics: Prometheus text a real parser reads, with counts that agree with the answers given."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_server import NAME, build_model

from xlora.serve.app import create_app
from xlora.serve.engine import Engine


def scrape(http) -> dict[tuple[str, tuple], float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_what_was_served(tiny):
    model, tok = build_model(tiny)
    engine = Engine(model, tok, max_batch=4, max_queue=8)
    with TestClient(create_app(engine, NAME)) as http:
        before = scrape(http)
        assert before[("xlora_queue_depth", (("model", NAME),))] == 0
        used = []
        for prompt in ("w1 w2", "w3"):
            r = http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 5})
            assert r.status_code == 200
            used.append(r.json()["usage"]["completion_tokens"])
        assert http.post("/v1/completions", json={"model": NAME, "prompt": ""}).status_code == 400
        for _ in range(100):  # the engine thread marks its rows done just after sending the last event
            got = scrape(http)
            if got[("xlora_running_rows", (("model", NAME),))] == 0:
                break
            time.sleep(0.02)
    label = (("model", NAME),)
    tokens = sum(used)
    assert got[("xlora_generated_tokens_total", label)] == tokens
    assert got[("xlora_time_to_first_token_seconds_count", label)] == 2  # one first token per answer
    assert got[("xlora_inter_token_latency_seconds_count", label)] == tokens - 2
    assert got[("xlora_step_rows_count", label)] >= max(used)  # at least one step per token of the longest
    assert got[("xlora_requests_total", (("model", NAME), ("status", "200")))] == 2
    assert got[("xlora_requests_total", (("model", NAME), ("status", "400")))] == 1
    assert got[("xlora_running_rows", label)] == 0


def test_two_apps_in_one_process_keep_their_own_metrics(tiny):
    apps = [create_app(Engine(*build_model(tiny)), name) for name in ("one", "two")]  # no duplicate registration
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        a.post("/v1/completions", json={"model": "one", "prompt": "w1", "max_tokens": 2})
        assert ("xlora_requests_total", (("model", "one"), ("status", "200"))) in scrape(a)
        assert not any(name == "xlora_requests_total" for name, _ in scrape(b))
