"""The app's error answers, all in OpenAI's shape: 400 / 404 for bad requests, Retry-After on 429
and 503, one line for bodies FastAPI could not parse or validate, 500 only for internal faults."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from xlora.serve.checks import BadRequest, ModelNotFound
from xlora.serve.http import RETRY_AFTER_S, body_problem, error_response, field_problem, unparsable_body


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 429: "rate_limit_error"}.get(exc.status_code, "invalid_request_error")
        response = error_response(exc.status_code, unparsable_body(exc) or str(exc.detail), kind)
        if exc.status_code in (429, 503):  # back-pressure: a queue slot frees within about a batch's time
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest):
        if isinstance(exc, ModelNotFound):
            return error_response(404, exc.message, "not_found_error", exc.param, "model_not_found")
        return error_response(400, exc.message, param=exc.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(http: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        whole = body_problem(errors, http.headers.get("content-type"))
        if whole is not None:
            return error_response(400, whole)
        problems = [field_problem(e) for e in errors]
        message = "; ".join(m for m, _ in problems) or "invalid request"
        return error_response(400, message, param=next((p for _, p in problems if p), None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")
