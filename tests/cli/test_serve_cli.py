"""`xlora serve` checks every option before it loads anything, with the library's own checks."""

from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient
from test_cli import one_error_line
from typer.testing import CliRunner

from xlora.cli import app
from xlora.serve.engine import Engine

runner = CliRunner()


def loading_is_a_bug(monkeypatch) -> None:
    """Make loading a base model fail the test: bad options must be refused before it."""

    def load_base(*args, **kwargs):
        raise AssertionError("the base model was loaded before the options were checked")

    monkeypatch.setattr("xlora.bases.loading.load_base", load_base)


@pytest.mark.parametrize(
    "options, needle",
    [
        (["--reuse-scalings-after", "0"], "serve: --reuse-scalings-after: expected an integer >= 1 or None, got 0"),
        (["--max-batch", "0"], "serve: --max-batch: expected an integer >= 1, got 0"),
        (["--max-queue", "0"], "serve: --max-queue: expected an integer >= 1, got 0"),
        (["--batch-wait-ms", "-1"], "serve: --batch-wait-ms: expected a finite number >= 0"),
        (["--batch-wait-ms", "nan"], "serve: --batch-wait-ms: expected a finite number >= 0"),
        (["--batch-wait-ms", "inf"], "serve: --batch-wait-ms: expected a finite number >= 0"),
        (["--model-name", ""], "--model-name: must not be empty"),
        (["--model-name", "  "], "serve: --model-name: expected a non-empty name"),
        (["--max-body-bytes", "10"], "serve: --max-body-bytes: expected an integer >= 1024"),
        (["--max-body-bytes", str(2**40)], "serve: --max-body-bytes: expected an integer >= 1024 and <= 1073741824"),
        (["--dtype", "float64"], "serve: --dtype: expected 'auto' or one of"),
        (["--quantize", "int4"], "serve: --quantize: expected one of"),
        (["--host", ""], "--host: must not be empty"),
        (["--port", "0"], "serve: --port: expected an integer >= 1 and <= 65535, got 0"),
        (["--port", "70000"], "serve: --port: expected an integer >= 1 and <= 65535, got 70000"),
        (["--device", "cdua"], "--device 'cdua': not a device name"),
        (["--request-timeout-s", "0"], "serve: --request-timeout-s: expected a finite number > 0"),
        (["--shutdown-grace-s", "-1"], "serve: --shutdown-grace-s: expected a finite number >= 0"),
    ],
)
def test_bad_options_are_one_line_before_loading(tiny_checkpoint, monkeypatch, options, needle):
    base_dir, checkpoint = tiny_checkpoint
    loading_is_a_bug(monkeypatch)
    result = runner.invoke(app, ["serve", "--checkpoint", str(checkpoint), "--base", str(base_dir), *options])
    assert needle in one_error_line(result)


def test_an_address_in_use_and_a_missing_checkpoint_are_refused_before_loading(tiny_checkpoint, monkeypatch, tmp_path):
    base_dir, checkpoint = tiny_checkpoint
    loading_is_a_bug(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--checkpoint", str(checkpoint), "--base", str(base_dir), "--port", str(port)]
        assert f"--port {port}: cannot listen there" in one_error_line(runner.invoke(app, args))
    missing = tmp_path / "nowhere"
    line = one_error_line(runner.invoke(app, ["serve", "--checkpoint", str(missing), "--base", str(base_dir)]))
    assert f"{missing}: checkpoint directory does not exist" in line


def test_the_options_reach_the_engine_and_the_app(tiny_checkpoint, monkeypatch):
    """--batch-wait-ms was accepted and then ignored (not passed to the Engine)."""
    base_dir, checkpoint = tiny_checkpoint
    made: dict = {}

    class SpyEngine(Engine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made["engine"] = self

    def run(app_, engines, host: str, port: int, grace_s: float) -> None:
        made["app"], made["address"], made["grace"] = app_, (host, port), grace_s
        made["engine"].shutdown()

    monkeypatch.setattr("xlora.serve.engine.Engine", SpyEngine)
    monkeypatch.setattr("xlora.cli.serve.run_until_signal", run)
    with socket.socket() as probe:  # a free port: the CLI checks that it can listen there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = ["--max-batch", "3", "--max-queue", "5", "--batch-wait-ms", "7.5", "--reuse-scalings-after", "2"]
    options += ["--request-timeout-s", "30", "--shutdown-grace-s", "4"]
    args = ["serve", "--checkpoint", str(checkpoint), "--base", str(base_dir), "--port", str(port), *options]
    result = runner.invoke(app, [*args, "--model-name", "mine"])
    assert result.exit_code == 0, result.output
    engine = made["engine"]
    assert (engine.max_batch, engine.max_queue, engine.reuse_scalings_after) == (3, 5, 2)
    assert engine.batch_wait_s == pytest.approx(0.0075)
    assert made["address"] == ("127.0.0.1", port) and "serving mine (" in result.output
    assert made["grace"] == 4
    with TestClient(made["app"]) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["mine"]


def test_several_checkpoints_share_one_base(tiny_checkpoint, monkeypatch):
    """--checkpoint NAME=DIR repeated: one engine per mixture, the base weights loaded once."""
    base_dir, checkpoint = tiny_checkpoint
    made: dict = {"engines": []}

    class SpyEngine(Engine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made["engines"].append(self)

    def run(app_, *args) -> None:
        made["app"] = app_
        for engine in made["engines"]:
            engine.shutdown()

    monkeypatch.setattr("xlora.serve.engine.Engine", SpyEngine)
    monkeypatch.setattr("xlora.cli.serve.run_until_signal", run)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = ["serve", "--base", str(base_dir), "--port", str(port)]
    result = runner.invoke(app, [*common, "--checkpoint", f"one={checkpoint}", "--checkpoint", f"two={checkpoint}"])
    assert result.exit_code == 0, result.output
    one, two = (e.model for e in made["engines"])

    def base_weights(model):
        return {p.data_ptr() for n, p in model.base.named_parameters() if "lora_" not in n}

    assert base_weights(one) == base_weights(two)  # the base weights exist once
    assert not {p.data_ptr() for p in one.classifier.parameters()} & {p.data_ptr() for p in two.classifier.parameters()}
    with TestClient(made["app"]) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["one", "two"]
    twice = runner.invoke(app, [*common, "--checkpoint", f"a={checkpoint}", "--checkpoint", f"a={checkpoint}"])
    assert twice.exit_code == 2 and "model id 'a' is given twice" in twice.output
    named = runner.invoke(
        app, [*common, "--checkpoint", str(checkpoint), "--checkpoint", f"b={checkpoint}", "--model-name", "x"]
    )
    assert named.exit_code == 2 and "--model-name: only with one --checkpoint" in named.output


def test_a_weak_or_unreadable_admin_token_is_refused_before_loading(tiny_checkpoint, tmp_path, monkeypatch):
    base_dir, checkpoint = tiny_checkpoint
    monkeypatch.setattr("xlora.bases.loading.load_base", lambda *a, **k: pytest.fail("loaded a model"))
    short = tmp_path / "token"
    short.write_text("abc\n")
    common = ["serve", "--checkpoint", str(checkpoint), "--base", str(base_dir)]
    r = runner.invoke(app, [*common, "--admin-token-file", str(short)])
    assert r.exit_code == 2 and "--admin-token-file" in r.output and "at least 16 printable characters" in r.output
    r = runner.invoke(app, [*common, "--admin-token-file", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "cannot read it" in r.output
    monkeypatch.setenv("XLORA_ADMIN_TOKEN", "short")
    r = runner.invoke(app, common)
    assert r.exit_code == 2 and "$XLORA_ADMIN_TOKEN" in r.output


def test_sigterm_answers_every_request_in_openai_shape(tiny_checkpoint, tmp_path):
    """A real server, a running and a queued request, then SIGTERM: both end with an answer or the
    shutdown error (503 JSON), the server exits in about the grace period, and no traceback is logged."""
    import json
    import signal
    import subprocess
    import sys
    import threading
    import time

    import httpx

    base_dir, checkpoint = tiny_checkpoint
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["serve", "--checkpoint", f"m={checkpoint}", "--base", str(base_dir), "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "xlora.cli", *args, "--max-batch", "1", "--shutdown-grace-s", "0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        answers: list = []

        def ask():
            body = {"model": "m", "prompt": "w1", "max_tokens": 400, "temperature": 0}
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
            answers.append((r.status_code, r.headers.get("content-type", ""), r.text))

        clients = [threading.Thread(target=ask) for _ in range(2)]
        for c in clients:
            c.start()
            time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        for c in clients:
            c.join(timeout=30)
        server.wait(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        server.kill()
    _, stderr = server.communicate()
    assert len(answers) == 2 and "Traceback" not in stderr, stderr
    for status, kind, text in answers:
        assert status in (200, 503) and kind.startswith("application/json"), (status, text)
        if status == 503:
            assert "shut down" in json.loads(text)["error"]["message"]
    assert any(status == 503 for status, _, _ in answers)  # the queued one at least
