"""OpenAI-compatible HTTP API over the serving engine (FastAPI).

POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /v1/models, GET /health.
Extension, off by default: `"xlora": {"return_scalings": "summary" | "tokens", "mask_experts": [...],
"top_k": k, "global_scaling_weight": w}`; the answer then carries an `xlora` object with each named
expert's weight (averaged over adapted modules) per generated token or over the answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .serving import Engine, MixtureOptions, QueueFull
from .serving import Request as GenRequest


class XLoraExtension(BaseModel):
    return_scalings: Literal["summary", "tokens"] | None = None
    mask_experts: list[str] = Field(default_factory=list)
    top_k: int | None = Field(default=None, ge=1)
    global_scaling_weight: float | None = None


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    xlora: XLoraExtension | None = None


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": None, "code": None}}
    )


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine` under the model id `model_name`."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="xlora", version="0.1.0", lifespan=lifespan)
    experts = engine.model.expert_names

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        kind = {404: "not_found_error", 429: "rate_limit_error"}.get(exc.status_code, "invalid_request_error")
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(400, "; ".join(parts) or "invalid request")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "waiting": len(engine.waiting),
            "decoding": engine.busy_rows,
            "cancelled": engine.cancelled_rows,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "xlora", "experts": experts}],
        }

    def check(req: Sampling, prompt_ids: list[int]) -> GenRequest:
        if req.model != model_name:
            raise HTTPException(404, f"model {req.model!r} not found; this server serves {model_name!r}")
        if req.n != 1:
            raise HTTPException(400, "n: only n=1 is supported")
        ext = req.xlora or XLoraExtension()
        unknown = [e for e in ext.mask_experts if e not in experts]
        if unknown:
            raise HTTPException(400, f"xlora.mask_experts: unknown expert(s) {unknown}; experts are {experts}")
        if len(set(ext.mask_experts)) >= len(experts):
            raise HTTPException(400, "xlora.mask_experts: at least one expert must stay")
        if ext.top_k is not None and ext.top_k > len(experts):
            raise HTTPException(400, f"xlora.top_k: at most the number of experts ({len(experts)})")
        room = engine.context_length - len(prompt_ids)
        wanted = req.max_completion_tokens or req.max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise HTTPException(
                400,
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is {wanted}; the context holds "
                f"{engine.context_length}",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return GenRequest(
            prompt_ids=prompt_ids,
            max_tokens=min(wanted or 256, room),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=stop,
            mixture=MixtureOptions(tuple(sorted(ext.mask_experts)), ext.top_k, ext.global_scaling_weight),
            want_scalings=ext.return_scalings is not None,
        )

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

    async def complete(req: Sampling, prompt_ids: list[int], http: Request, chat: bool):
        gen = check(req, prompt_ids)
        ext = req.xlora or XLoraExtension()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        stream = run(gen, http)
        first = await anext(stream)  # raises 429 before any byte is sent
        if not req.stream:
            return await collect(first, stream, req, ext, rid, created, len(prompt_ids), chat)
        return StreamingResponse(
            sse(first, stream, req, ext, rid, created, len(prompt_ids), chat), media_type="text/event-stream"
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
                yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error'}})}\n\n"
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
        tok = engine.tokenizer
        messages = [m.model_dump() for m in req.messages]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return await complete(req, tok(text, add_special_tokens=False)["input_ids"], http, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        return await complete(req, engine.tokenizer(req.prompt)["input_ids"], http, chat=False)

    return app


async def _chain(first, rest) -> AsyncIterator[tuple]:
    yield first
    async for ev in rest:
        yield ev
