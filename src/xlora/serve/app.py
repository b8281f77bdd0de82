"""OpenAI-compatible HTTP API over the serving engine (FastAPI).

POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /v1/models, GET /health.
Extension, off by default: `"xlora": {"return_scalings": "summary" | "tokens", "mask_experts": [...],
"top_k": k, "global_scaling_weight": w}`; the answer then carries an `xlora` object with each named
expert's weight (averaged over adapted modules) per generated token or over the answer.

Requests are checked (see `server_checks`: unsupported OpenAI fields, unknown extension fields,
roles, numeric ranges) and prepared in a worker thread; bodies over a size cap are refused with 413.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version as package_version
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xlora.serve.checks import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    ModelNotFound,
    Sampling,
    XLoraExtension,
    prepare,
)
from xlora.serve.engine import Engine, QueueFull
from xlora.serve.engine import Request as GenRequest

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB


def _error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    """A response with OpenAI's error shape."""
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}}
    )


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before the app parses it.

    The body is read up to the bound and handed on. A larger body is drained (not kept) up to
    `drain_bytes` before answering, so that a client still sending it reads the 413 rather than a
    reset connection; a body declared larger than that is answered at once.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int = 64 << 20) -> None:
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, max(drain_bytes, max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else 0  # what the client said, or what arrived
        kept: list[bytes] = []
        received = 0
        first: Message = {"type": "http.request", "body": b"", "more_body": False}
        while size <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":  # the client left; the app sees that
                first = message
                break
            body = message.get("body", b"")
            received += len(body)
            size = max(size, received)
            if received <= self.max_bytes:
                kept.append(body)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(kept), "more_body": False}
                break
        if size > self.max_bytes:
            text = f"the request body exceeds {self.max_bytes} bytes"
            await _error(413, text, code="request_too_large")(scope, receive, send)
            return
        replayed = False

        async def receive_again() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, receive_again, send)


def create_app(engine: Engine, model_name: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `engine` under the model id `model_name`.

    `max_body_bytes` caps a request's body (default 1 MiB, about 250k tokens of English, far beyond
    the context of most models); a larger body is answered 413 before it is parsed, so one client
    cannot make the server parse and tokenise megabytes. Request preparation (chat template,
    tokenisation, checks) runs in a worker thread, off the event loop: `/health` and streams stay
    responsive while a long prompt is tokenised. Every error body has OpenAI's shape
    `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request, 404 for an unknown
    model, 413 for a body over the cap, 429 for a full queue; 500 only for an internal fault.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="xlora", version=package_version("xlora"), lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    experts = engine.model.expert_names

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 429: "rate_limit_error"}.get(exc.status_code, "invalid_request_error")
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest):
        if isinstance(exc, ModelNotFound):
            return _error(404, exc.message, "not_found_error", exc.param, "model_not_found")
        return _error(400, exc.message, param=exc.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        parts, params = [], []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            msg = "unknown field" if err.get("type") == "extra_forbidden" else str(err.get("msg"))
            parts.append(f"{where}: {msg}" if where else msg)
            params.append(where)
        return _error(400, "; ".join(parts) or "invalid request", param=next((p for p in params if p), None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "waiting": len(engine.waiting),
            "decoding": engine.busy_rows,
            "cancelled": engine.cancelled_rows,
            "base": base_info,
        }

    from xlora.bases.loading import describe_base

    base_info = describe_base(engine.model.base)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "xlora",
                    "experts": experts,
                    "base": base_info,  # {"dtype", "quantization"} of the base model under the mixture
                }
            ],
        }

    async def run(gen: GenRequest, http: Request) -> AsyncIterator[tuple]:
        """Submit and yield the engine's events; a client that goes away cancels its row."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        engine.dispatch = lambda fn: loop.call_soon_threadsafe(fn)  # one loop wake-up per decoding step
        gen.emit = events.put_nowait
        try:
            engine.submit(gen)
        except QueueFull as e:
            raise HTTPException(429, str(e)) from None
        except ValueError as e:  # the engine's own check (server checks should have caught it)
            raise BadRequest(str(e)) from None
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                yield ev
                if ev[0] in ("end", "error"):
                    return
        finally:
            gen.cancelled.set()  # no-op once finished; frees the row if the client left

    def weights_dict(w) -> dict[str, float]:
        return {name: round(float(x), 6) for name, x in zip(experts, w.tolist())}

    async def complete(req: Sampling, http: Request, chat: bool):
        """Prepare `req` in a worker thread (tokenising a long prompt must not stall the loop), then run it."""
        gen, n_prompt = await anyio.to_thread.run_sync(
            prepare, req, engine.tokenizer, experts, model_name, engine.context_length
        )
        ext = req.xlora or XLoraExtension()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        stream = run(gen, http)
        first = await anext(stream)  # raises 429 before any byte is sent
        if not req.stream:
            return await collect(first, stream, req, ext, rid, created, n_prompt, chat)
        return StreamingResponse(
            sse(first, stream, req, ext, rid, created, n_prompt, chat), media_type="text/event-stream"
        )

    async def collect(first, stream, req, ext, rid, created, n_prompt, chat):
        text, tokens, per_token, reason = "", 0, [], "length"
        async for ev in _chain(first, stream):
            if ev[0] == "error":
                return _error(500, ev[1], "server_error")
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
            body["xlora"] = scalings_report(ext.return_scalings, per_token)
        return body

    def scalings_report(mode: str, per_token: list) -> dict[str, Any]:
        report: dict[str, Any] = {"experts": experts}
        if mode == "tokens":
            report["tokens"] = [{"token": t, "weights": weights_dict(w)} for t, w in per_token]
        else:
            import torch

            mean = torch.stack([w for _, w in per_token]).mean(0) if per_token else torch.zeros(len(experts))
            report["summary"] = weights_dict(mean)
        return report

    async def sse(first, stream, req, ext, rid, created, n_prompt, chat) -> AsyncIterator[str]:
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
        async for ev in _chain(first, stream):
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
                        extra = {"xlora": {"token": per_token[-1][0], "weights": weights_dict(ev[3])}}
                if ev[2] or extra:
                    yield chunk(ev[2], None, extra)
            elif ev[0] == "text" and ev[1]:
                yield chunk(ev[1], None)
            elif ev[0] == "end":
                extra = {
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": tokens, "total_tokens": n_prompt + tokens}
                }
                if ext.return_scalings:
                    extra["xlora"] = scalings_report(ext.return_scalings, per_token)
                yield chunk(None, ev[1], extra)
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, http: Request):
        return await complete(req, http, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        return await complete(req, http, chat=False)

    return app


async def _chain(first, rest) -> AsyncIterator[tuple]:
    yield first
    async for ev in rest:
        yield ev
