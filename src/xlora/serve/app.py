"""OpenAI-compatible HTTP API over the serving engine (FastAPI).

POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /v1/models, GET /health.
Extension, off by default: `"xlora": {"return_scalings": "summary" | "tokens", "mask_experts": [...],
"top_k": k, "global_scaling_weight": w}`; the answer then carries an `xlora` object with each named
expert's weight (averaged over adapted modules) per generated token or over the answer.

Requests are checked (see `server_checks`: unsupported OpenAI fields, unknown extension fields,
roles, numeric ranges) and prepared in a worker thread; bodies over a size cap are refused with 413.

The body must be sent as JSON (`Content-Type: application/json` or `application/*+json`); a body
sent as text/plain, as a form or without a Content-Type is a 400 even when it holds valid JSON.
A decision: every OpenAI SDK sends application/json, and a server usually run on localhost must
not accept the content types a web page can POST cross-site without a CORS preflight (text/plain,
forms, none), or any page the user visits could spend the server's compute.

A client that disconnects (streaming or not, waiting or decoding) cancels its request at once:
a waiting request leaves the queue, a decoding row leaves its batch at the next step (`DisconnectWatch`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from importlib.metadata import version as package_version
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from xlora.core.checks import check_number
from xlora.serve.admin import Loader, add_admin_routes, check_token
from xlora.serve.checks import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    ModelNotFound,
    Sampling,
    XLoraExtension,
    prepare,
)
from xlora.serve.engine import SHUTDOWN_MESSAGE, Engine, QueueFull, ShuttingDown
from xlora.serve.engine import Request as GenRequest
from xlora.serve.errors import install_error_handlers
from xlora.serve.http import (
    CLIENT_GONE,
    DEFAULT_MAX_BODY_BYTES,
    GONE,
    MAX_BODY_BYTES,
    MIN_BODY_BYTES,
    MODEL_KEY,
    WATCH_KEY,
    BodyLimit,
    DisconnectWatch,
    RequestWatch,
    error_response,
)
from xlora.serve.metrics import ServerMetrics, StatusCount

MAX_NAME_CHARS = 200


def check_app_options(
    model_name: object,
    max_body_bytes: object,
    where: str = "create_app",
    name: Callable[[str], str] = str,
    request_timeout_s: object = None,
) -> None:
    """ValueError `<where>: <name(option)>: ...` for an app option that cannot work (`xlora serve` checks with it)."""
    if not isinstance(model_name, str) or not model_name.strip() or model_name != model_name.strip():
        raise ValueError(
            f"{where}: {name('model_name')}: expected a non-empty name without surrounding spaces, got {model_name!r}"
        )
    if not model_name.isprintable() or any(c in model_name for c in "/\\?#%") or len(model_name) > MAX_NAME_CHARS:
        raise ValueError(  # it appears in URLs (/admin/mixtures/{name}), logs and metrics labels
            f"{where}: {name('model_name')}: expected at most {MAX_NAME_CHARS} printable characters without "
            f"/ \\ ? # %, got {model_name!r}"
        )
    check_number(where, name("max_body_bytes"), max_body_bytes, integer=True, low=MIN_BODY_BYTES, high=MAX_BODY_BYTES)
    check_number(where, name("request_timeout_s"), request_timeout_s, low=0, low_open=True, high=MAX_TIMEOUT_S,
                 optional=True)  # fmt: skip


MAX_TIMEOUT_S = 86400.0  # a day: beyond it a timeout protects nothing


def as_engines(engine: Engine | Mapping[str, Engine], model_name: str | None) -> dict[str, Engine]:
    """{model id: Engine}: one engine with its `model_name`, or a mapping of them (several mixtures)."""
    if isinstance(engine, Engine):
        return {model_name: engine}  # type: ignore[dict-item] - the name is checked by check_app_options
    if not isinstance(engine, Mapping):
        raise TypeError(
            f"create_app: engine: expected an xlora.serve.engine.Engine or a mapping of model ids to them, "
            f"got {type(engine).__name__}"
        )
    if not engine:
        raise ValueError("create_app: engine: the mapping of model ids to engines is empty")
    if model_name is not None:
        raise TypeError("create_app: model_name: not with a mapping of engines (its keys are the model ids)")
    wrong = [type(e).__name__ for e in engine.values() if not isinstance(e, Engine)]
    if wrong:
        raise TypeError(f"create_app: engine: every value must be an Engine, got {wrong[0]}")
    if len({id(e) for e in engine.values()}) < len(engine):
        raise ValueError("create_app: engine: one Engine is mapped under two model ids; give each its own")
    return dict(engine)


def create_app(
    engine: Engine | Mapping[str, Engine],
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    request_timeout_s: float | None = None,
    admin_token: str | None = None,
    loader: Loader | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` under the model id `model_name`, or several mixtures:
    `engine` a mapping {model id: Engine} (each request's `model` picks one; `/v1/models` lists all).

    `max_body_bytes` caps a request's body (default 1 MiB, about 250k tokens of English, far beyond
    the context of most models); a larger body is answered 413 before it is parsed, so one client
    cannot make the server parse and tokenise megabytes. Request preparation (chat template,
    tokenisation, checks) runs in a worker thread, off the event loop: `/health` and streams stay
    responsive while a long prompt is tokenised. Every error body has OpenAI's shape
    `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request, 404 for an unknown
    model, 413 for a body over the cap, 429 for a full queue; 500 only for an internal fault.
    A body must be JSON sent as application/json (see the module docstring for why).
    `request_timeout_s` bounds a request from its arrival to its last token: past it the request
    leaves the engine and the client gets 504 (a stream: an error event); None waits as long as it takes.
    A request that arrives while the engine shuts down gets 503 with Retry-After.
    `admin_token` with `loader` (a checkpoint folder -> Engine) adds the routes that load and unload
    mixtures at runtime (`xlora.serve.admin`); without a token there are none.
    Bad arguments raise at once: `check_app_options` here, `check_engine_options` in the Engine.
    """
    engines = as_engines(engine, model_name)
    for name in engines:
        check_app_options(name, max_body_bytes, request_timeout_s=request_timeout_s)
    if admin_token is not None:
        check_token(admin_token)
        if not callable(loader):
            raise TypeError("create_app: loader: the admin routes need a loader (checkpoint folder -> Engine)")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        for each in list(engines.values()):
            each.shutdown()

    app = FastAPI(title="xlora", version=package_version("xlora"), lifespan=lifespan)
    metrics = ServerMetrics(engines)
    app.add_middleware(DisconnectWatch)
    app.add_middleware(StatusCount, count=metrics.count)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)  # added last, so it runs first
    experts_of = {name: e.model.expert_names for name, e in engines.items()}

    install_error_handlers(app)

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def counts(e: Engine) -> dict[str, int]:
        return {"waiting": len(e.waiting), "decoding": e.busy_rows, "cancelled": e.cancelled_rows}

    @app.get("/health")
    async def health():
        per_model = {name: counts(e) for name, e in engines.items()}
        totals = {k: sum(c[k] for c in per_model.values()) for k in ("waiting", "decoding", "cancelled")}
        first = next(iter(engines))
        return {"status": "ok", **totals, "base": base_info[first], "models": per_model}

    from xlora.bases.loading import describe_base

    base_info = {name: describe_base(e.model.base) for name, e in engines.items()}

    def model_card(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "xlora",
            "experts": experts_of[name],
            "base": base_info[name],  # {"dtype", "quantization"} of the base model under the mixture
        }

    @app.get("/v1/models/{name}")
    async def model(name: str):
        engine_for(name)  # 404 naming the served ids
        return model_card(name)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in engines]}

    if admin_token is not None:

        def added(name: str, engine: Engine) -> None:
            experts_of[name], base_info[name] = engine.model.expert_names, describe_base(engine.model.base)
            metrics.add(name, engine)

        def removed(name: str) -> None:
            experts_of.pop(name, None), base_info.pop(name, None)
            metrics.remove(name)

        add_admin_routes(
            app, engines, added, removed, admin_token, loader, lambda n: check_app_options(n, max_body_bytes)
        )

    def engine_for(model: str) -> Engine:
        if model not in engines:
            served = ", ".join(repr(n) for n in engines)
            raise ModelNotFound(f"model {model!r} not found; this server serves {served}", "model")
        return engines[model]

    def leave(gen: GenRequest, events: asyncio.Queue, engine: Engine) -> None:
        """The client left: cancel its request in the engine and end its events with GONE."""
        engine.cancel(gen)
        events.put_nowait(GONE)

    def submit(gen: GenRequest, watch: RequestWatch, engine: Engine) -> asyncio.Queue:
        """Queue `gen` (429 when the queue is full); its events come on the returned queue, GONE if its client left."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        engine.dispatch = loop.call_soon_threadsafe  # one loop wake-up per decoding step
        gen.emit = events.put_nowait
        try:
            engine.submit(gen)
        except QueueFull as e:
            raise HTTPException(429, str(e)) from None
        except ShuttingDown as e:
            raise HTTPException(503, str(e)) from None
        except ValueError as e:  # the engine's own check (server checks should have caught it)
            raise BadRequest(str(e)) from None
        watch.on_end(lambda: leave(gen, events, engine))  # at once if the client left while it was prepared
        return events

    def deadline(arrived: float) -> float | None:
        return None if request_timeout_s is None else arrived + request_timeout_s

    def weights_dict(w, experts: list[str]) -> dict[str, float]:
        return {name: round(float(x), 6) for name, x in zip(experts, w.tolist())}

    async def complete(req: Sampling, http: Request, chat: bool):
        """Prepare `req` in a worker thread (tokenising a long prompt must not stall the loop), then run it."""
        engine = engine_for(req.model)
        http.scope[MODEL_KEY] = req.model  # the answers-by-status metric's label
        experts = experts_of[req.model]
        gen, n_prompt = await anyio.to_thread.run_sync(
            prepare, req, engine.tokenizer, experts, req.model, engine.context_length
        )
        ext = req.xlora or XLoraExtension()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created, arrived = int(time.time()), time.monotonic()
        queue = submit(gen, http.scope[WATCH_KEY], engine)  # 429 before any byte
        events = metrics.timed(until_last(queue, deadline(arrived), lambda: engine.cancel(gen)), arrived, req.model)
        if not req.stream:
            return await collect(events, req, ext, rid, created, n_prompt, chat, engine, experts)
        stream = sse(events, req, ext, rid, created, n_prompt, chat, engine, experts)
        return StreamingResponse(stream, media_type="text/event-stream")

    async def collect(events, req, ext, rid, created, n_prompt, chat, engine: Engine, experts: list[str]):
        text, tokens, per_token, reason = "", 0, [], "length"
        async for ev in events:
            if ev is GONE:
                return Response(status_code=CLIENT_GONE)  # nobody reads it; the access log shows why
            if ev[0] == "error":
                status = 504 if ev[-1] == TIMEOUT_KIND else 503 if ev[1] == SHUTDOWN_MESSAGE else 500
                return error_response(status, ev[1], "server_error")
            if ev[0] == "token":
                tokens += 1
                text += ev[2]
                if ev[3] is not None:
                    per_token.append((engine.tokenizer.decode([ev[1]]), ev[3]))
            elif ev[0] == "text":
                text += ev[1]
            elif ev[0] == "end":
                reason = ev[1]
        choice = {"index": 0, "finish_reason": reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        body = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": req.model,
            "choices": [choice],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": tokens, "total_tokens": n_prompt + tokens},
        }
        if ext.return_scalings:
            body["xlora"] = scalings_report(ext.return_scalings, per_token, experts)
        return body

    def scalings_report(mode: str, per_token: list, experts: list[str]) -> dict[str, Any]:
        report: dict[str, Any] = {"experts": experts}
        if mode == "tokens":
            report["tokens"] = [{"token": t, "weights": weights_dict(w, experts)} for t, w in per_token]
        else:
            import torch

            mean = torch.stack([w for _, w in per_token]).mean(0) if per_token else torch.zeros(len(experts))
            report["summary"] = weights_dict(mean, experts)
        return report

    async def sse(
        events, req, ext, rid, created, n_prompt, chat, engine: Engine, experts: list[str]
    ) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, reason: str | None, extra: dict | None = None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if delta_text:
                    delta["content"] = delta_text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
            body = {"id": rid, "object": kind, "created": created, "model": req.model, "choices": [choice]}
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        per_token, tokens = [], 0
        if chat:
            yield chunk(None, None, role=True)
        async for ev in events:
            if ev is GONE:
                return
            if ev[0] == "error":
                err = {"message": ev[1], "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                return
            if ev[0] == "token":
                tokens += 1
                extra = None
                if ev[3] is not None:
                    per_token.append((engine.tokenizer.decode([ev[1]]), ev[3]))
                    if ext.return_scalings == "tokens":
                        extra = {"xlora": {"token": per_token[-1][0], "weights": weights_dict(ev[3], experts)}}
                if ev[2] or extra:
                    yield chunk(ev[2], None, extra)
            elif ev[0] == "text" and ev[1]:
                yield chunk(ev[1], None)
            elif ev[0] == "end":
                extra = {
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": tokens, "total_tokens": n_prompt + tokens}
                }
                if ext.return_scalings:
                    extra["xlora"] = scalings_report(ext.return_scalings, per_token, experts)
                yield chunk(None, ev[1], extra)
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, http: Request):
        return await complete(req, http, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        return await complete(req, http, chat=False)

    return app


TIMEOUT_KIND = "timeout"


async def until_last(
    events: asyncio.Queue, deadline: float | None = None, on_timeout: Callable[[], None] = lambda: None
) -> AsyncIterator[tuple]:
    """A request's events up to and including its last: ("end", ...), ("error", ...) or GONE; past
    `deadline` (time.monotonic) `on_timeout` runs (it cancels the engine's work) and an error event ends them."""
    while True:
        try:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ev = await asyncio.wait_for(events.get(), timeout=left)
        except asyncio.TimeoutError:
            on_timeout()
            yield ("error", "the request took longer than the server's request timeout", TIMEOUT_KIND)
            return
        yield ev
        if ev is GONE or ev[0] in ("end", "error"):
            return
