"""Loading and unloading mixtures while the server runs: `POST /admin/mixtures` {"name", "checkpoint"}
and `DELETE /admin/mixtures/{name}`, behind a bearer token.

Decisions: the admin routes exist only when the app is given a token (`xlora serve` reads it from
the environment variable XLORA_ADMIN_TOKEN or from `--admin-token-file`); a request without the
right `Authorization: Bearer <token>` gets 401 (compared in constant time). A checkpoint that fails
to load is refused with the loader's own error (400) and every other mixture keeps serving. An
unloaded mixture stops taking requests at once (its id answers 404) and its engine stops when the
requests it already holds have finished.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict

from xlora.serve.engine import Engine

Loader = Callable[[Path], Engine]
"""A checkpoint folder -> its Engine over the shared base (raises ValueError/OSError with a clear message)."""

MIN_TOKEN_CHARS = 16  # a shorter shared secret is guessable


class LoadRequest(BaseModel):
    """The body of POST /admin/mixtures."""

    model_config = ConfigDict(extra="forbid")

    name: str
    checkpoint: str


def check_token(token: object) -> None:
    """An admin token must be a string of at least MIN_TOKEN_CHARS printable characters."""
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS or not token.isprintable() or token != token.strip():
        raise ValueError(f"admin token: expected at least {MIN_TOKEN_CHARS} printable characters without spaces around")


def drain_then_stop(engine: Engine, poll_s: float = 0.05) -> None:
    """Wait until `engine` holds no request, then stop it (in a thread: requests keep streaming)."""

    def run() -> None:
        while engine.waiting or engine.busy_rows:
            time.sleep(poll_s)
        engine.shutdown()

    threading.Thread(target=run, name="xlora-unload", daemon=True).start()


def add_admin_routes(
    app: FastAPI,
    engines: MutableMapping[str, Engine],
    on_add: Callable[[str, Engine], None],
    on_remove: Callable[[str], None],
    token: str,
    loader: Loader,
    check_name: Callable[[str], None],
) -> None:
    """The two admin routes on `app`, editing `engines` (the routing table the completion routes read)."""
    check_token(token)

    def authorize(http: Request) -> None:
        given = http.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "admin: missing or wrong bearer token")

    @app.post("/admin/mixtures")
    async def load_mixture(http: Request) -> dict[str, Any]:
        authorize(http)  # before the body is read: a client without the token learns nothing of it
        try:
            body = LoadRequest.model_validate(await http.json())
        except ValueError as e:  # invalid JSON or fields (pydantic's ValidationError is a ValueError)
            first = str(e).splitlines()
            raise HTTPException(400, f'admin: expected {{"name": ..., "checkpoint": ...}}: {first[0]}') from None
        try:
            check_name(body.name)
        except ValueError as e:
            raise HTTPException(400, f"name: {e}") from None
        if body.name in engines:
            raise HTTPException(409, f"a mixture named {body.name!r} is already served; unload it first")
        try:
            engine = await anyio.to_thread.run_sync(loader, Path(body.checkpoint))
        except (ValueError, OSError) as e:  # the loader's own one-line error; the others keep serving
            raise HTTPException(400, f"checkpoint {body.checkpoint}: {e}") from None
        if any(engine is e for e in engines.values()):  # unloading one id would stop the other
            raise HTTPException(409, "admin: the loader returned an engine that is already served")
        if body.name in engines:  # another load of that name finished first
            engine.shutdown()
            raise HTTPException(409, f"a mixture named {body.name!r} is already served; unload it first")
        engines[body.name] = engine
        on_add(body.name, engine)
        return {"loaded": body.name, "experts": engine.model.expert_names}

    @app.delete("/admin/mixtures/{name}")
    async def unload_mixture(name: str, http: Request) -> dict[str, Any]:
        authorize(http)
        if name not in engines:
            raise HTTPException(404, f"no mixture named {name!r} is served")
        if len(engines) == 1:
            raise HTTPException(409, "the last mixture cannot be unloaded; load another first")
        engine = engines.pop(name)
        on_remove(name)
        drain_then_stop(engine)
        return {"unloaded": name}
