"""HTTP plumbing beneath the routes: OpenAI-shaped error responses, the body cap, the disconnect
watch, and one-line messages for bodies and fields FastAPI could not validate."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

RETRY_AFTER_S = 1  # the Retry-After of a 429: a queue slot frees as soon as a waiting request starts
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
# Bounds of the body cap: under 1 KiB ordinary requests are refused, over 1 GiB one request can
# make the server hold a gigabyte.
MIN_BODY_BYTES, MAX_BODY_BYTES = 1 << 10, 1 << 30
MODEL_KEY = "xlora.model"  # the scope key of the model id a request asked for (metrics labels)
WATCH_KEY = "xlora.watch"  # the scope key of a request's RequestWatch
CLIENT_GONE = 499  # the status of an answer nobody is left to read (nginx's "client closed request")
GONE = ("gone",)  # the event that ends a request's events when its client has left
BODY_MUST_BE_JSON = "the request body must be a JSON object (Content-Type: application/json)"


def error_response(
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
            await error_response(413, text, code="request_too_large")(scope, receive, send)
            return
        replayed = False

        async def receive_again() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, receive_again, send)


class RequestWatch:
    """Whether a request is over: its client disconnected, or the app finished with it.

    Callbacks given to `on_end` run once, on the event loop, the moment that happens (at once if it
    already has); the server's one cancels the request's engine work.
    """

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self._callbacks: list[Callable[[], None]] = []

    def on_end(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the request ends, or now if it has."""
        if self.ended.is_set():
            callback()
        else:
            self._callbacks.append(callback)

    def end(self) -> None:
        """Mark the request over and run the callbacks (once)."""
        if self.ended.is_set():
            return
        self.ended.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class DisconnectWatch:
    """ASGI middleware: ends a request's `RequestWatch` (in `scope[WATCH_KEY]`) the moment its client disconnects.

    Starlette notices a disconnect only when something polls `receive` or a streamed write fails;
    neither happens while a non-streaming request waits for its answer, so a client that left kept
    its row decoding. Once the app has read the body, one task per request reads `receive` and ends
    the watch on `http.disconnect`; later `receive` calls of the app wait for the watch instead, so
    that task stays the channel's only reader. The watch also ends when the app returns or fails.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watch = RequestWatch()
        scope[WATCH_KEY] = watch
        listener: asyncio.Task | None = None

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            watch.end()

        async def app_receive() -> Message:
            nonlocal listener
            if listener is not None or watch.ended.is_set():
                await watch.ended.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                watch.end()
            elif not message.get("more_body", False):  # the body is complete: watch from now on
                listener = asyncio.create_task(listen())
            return message

        try:
            await self.app(scope, app_receive, send)
        finally:
            if listener is not None:
                listener.cancel()
            watch.end()


def is_json_content_type(content_type: str | None) -> bool:
    """application/json or application/*+json (parameters such as charset aside): what FastAPI parses as JSON."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def json_kind(value: Any) -> str:
    """What a JSON value is, in words, for an error message."""
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, str):
        return "a JSON string"
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, (int, float)):
        return "a JSON number"
    return "JSON null" if value is None else "something else"


def body_problem(errors: list[dict[str, Any]], content_type: str | None) -> str | None:
    """One line when the body as a whole is wrong (not sent as JSON, invalid, empty, not an object), else None."""
    if not is_json_content_type(content_type):
        sent = f"got Content-Type: {content_type}" if content_type else "no Content-Type was sent"
        return f"{BODY_MUST_BE_JSON}; {sent}"
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "invalid JSON")
            at = f" at position {loc[1]}" if len(loc) > 1 else ""
            return f"the request body is not valid JSON: {detail}{at}"
        if loc == ("body",):
            if e.get("type") == "missing":
                return "the request body is empty; send a JSON object (Content-Type: application/json)"
            return f"{BODY_MUST_BE_JSON}; got {json_kind(e.get('input'))}"
    return None


def unparsable_body(exc: BaseException) -> str | None:
    """Why FastAPI could not parse a body (its own text only says that it could not), or None."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at position {cause.start})"
    if isinstance(cause, RecursionError):
        return "the request body is nested too deeply to parse; send a flatter JSON object"
    return None


def field_problem(error: dict[str, Any]) -> tuple[str, str]:
    """(one-line message, dotted field path) for a field FastAPI could not validate: `messages: field required`."""
    loc = tuple(error.get("loc", ()))
    where = ".".join(str(x) for x in (loc[1:] if loc[:1] == ("body",) else loc))
    kind = error.get("type")
    msg = {"extra_forbidden": "unknown field", "missing": "field required"}.get(kind, str(error.get("msg")))
    return (f"{where}: {msg}" if where else msg), where
