"""`xlora serve`: every option checked before anything loads (with the engine's and the app's own
checks, spelled as flags), then the model served over the OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xlora.cli.app import DtypeOption, QuantizeOption, app, checkpoint_path, out, pick_device
from xlora.core.checks import check_number


def flag(option: str) -> str:
    """A Python option name as its command-line flag: max_batch -> --max-batch."""
    return "--" + option.replace("_", "-")


def bind_error(family: int, kind: int, proto: int, address: tuple) -> OSError | None:
    """Bind a socket to `address` as uvicorn would (SO_REUSEADDR) and let go; the error, or None."""
    import socket

    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            return e
    return None


def check_listen_address(host: str, port: int) -> None:
    """Refuse a host/port the server could not listen on (bad port, unknown host, address in use, no
    permission) by binding it once and letting go: that must fail before a model load, not after it."""
    import errno
    import socket

    check_number("serve", "--port", port, integer=True, low=1, high=65535)
    if not host.strip():
        raise ValueError("serve: --host: expected an address or host name (127.0.0.1, 0.0.0.0, localhost), got ''")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"serve: --host {host!r}: not an address or a known host name ({e.strerror})") from None
    errors = [bind_error(family, kind, proto, address) for family, kind, proto, _, address in addresses]
    # an address family the machine lacks (EADDRNOTAVAIL) is skipped, as asyncio does, unless all are
    fatal = [e for e in errors if e is not None and e.errno != errno.EADDRNOTAVAIL]
    if fatal or all(e is not None for e in errors):
        reason = next(e for e in (fatal or errors) if e is not None)
        raise ValueError(f"serve: --host {host} --port {port}: cannot listen there ({reason.strerror})")


def check_precision_options(dtype: str, quantize: str | None) -> None:
    """`--dtype` and `--quantize` as `load_base` checks them (bitsandbytes installed too), before it loads."""
    import torch

    from xlora.bases.loading import parse_dtype, quantization_config

    try:
        torch_dtype = parse_dtype(dtype)
    except ValueError as e:
        raise ValueError(f"serve: --dtype: {str(e).removeprefix('dtype: ')}") from None
    try:
        quantization_config(quantize, torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32)
    except ValueError as e:
        raise ValueError(f"serve: --quantize: {str(e).removeprefix('quantization: ')}") from None


def check_serve_options(
    host: str,
    port: int,
    max_batch: int,
    max_queue: int,
    batch_wait_ms: float,
    reuse_scalings_after: int | None,
    model_name: str,
    max_body_bytes: int,
    dtype: str,
    quantize: str | None,
    request_timeout_s: float | None = None,
    shutdown_grace_s: float = 10.0,
) -> None:
    """Refuse `serve` options that would fail later, before anything loads: the Engine's and the app's own
    checks with the options spelled as flags, then the precision options, then the address."""
    from xlora.serve.app import check_app_options
    from xlora.serve.engine import check_engine_options

    check_engine_options(max_batch, max_queue, batch_wait_ms, reuse_scalings_after, where="serve", name=flag)
    check_app_options(model_name, max_body_bytes, where="serve", name=flag, request_timeout_s=request_timeout_s)
    check_number("serve", flag("shutdown_grace_s"), shutdown_grace_s, low=0, high=3600)
    check_precision_options(dtype, quantize)
    check_listen_address(host, port)


def run_until_signal(app_, engines: dict, host: str, port: int, grace_s: float) -> None:
    """uvicorn until SIGTERM / Ctrl-C. Then every engine starts stopping at once: waiting requests
    get the shutdown error (503 / an error event), running ones may finish within `grace_s` and
    then get it too; uvicorn waits a little longer than that so those answers reach their clients."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            for engine in list(engines.values()):
                engine.begin_shutdown(grace_s)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_s + 3)
    Server(config).run()


def admin_token(path: Path | None) -> str | None:
    """The admin routes' bearer token: the file's content (stripped), else $XLORA_ADMIN_TOKEN, else None (off)."""
    import os

    from xlora.serve.admin import check_token

    if path is not None:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"serve: --admin-token-file {path}: cannot read it ({e})") from None
    else:
        token = os.environ.get("XLORA_ADMIN_TOKEN") or None
    if token is not None:
        try:
            check_token(token)
        except ValueError as e:
            source = f"--admin-token-file {path}" if path is not None else "$XLORA_ADMIN_TOKEN"
            raise ValueError(f"serve: {source}: {e}") from None
    return token


def parse_mixtures(items: list[str], model_name: str | None) -> dict[str, Path]:
    """{model id: checkpoint dir} from `--checkpoint DIR` (id: --model-name or the folder name) or
    repeated `--checkpoint NAME=DIR`; ids must be distinct, --model-name only with one checkpoint."""
    if model_name is not None and len(items) > 1:
        raise ValueError("serve: --model-name: only with one --checkpoint (name several as NAME=DIR)")
    mixtures: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if Path(item).is_dir():  # a folder whose name holds "=" (runs/lr=0.1) is a folder
            name, sep, folder = "", "", item
        if not sep:  # a plain folder: named by --model-name, else by the folder itself
            folder = item
        elif not folder.strip():
            raise ValueError(f"serve: --checkpoint {item!r}: no folder after '=' (NAME=DIR)")
        else:
            from xlora.serve.app import check_app_options

            label = f"--checkpoint {item!r}: the model id"
            check_app_options(name, 1 << 20, where="serve", name=lambda _, label=label: label)
        path = checkpoint_path(Path(folder))
        if not sep:
            name = model_name if model_name is not None else path.resolve().name
        if name in mixtures:
            raise ValueError(f"serve: --checkpoint: model id {name!r} is given twice; name them NAME=DIR")
        mixtures[name] = path
    return mixtures


@app.command()
def serve(
    checkpoint: Annotated[
        list[str],
        typer.Option(help="An X-LoRA checkpoint directory (native or PEFT); NAME=DIR, repeatable: several mixtures."),
    ],
    base: Annotated[str, typer.Option(help="'default' (embedded SmolLM2) or a local HF model dir.")] = "default",
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (1 to 65535).")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together (>= 1).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before 429 (>= 1).")] = 64,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a new batch waits to fill up (0 to 60000).")] = 20.0,
    reuse_scalings_after: Annotated[
        int | None, typer.Option(help="Stop the scaling pass after this many new tokens (>= 1).")
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Model id clients use (default: checkpoint folder name).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present).")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body, else 413 (1 KiB to 1 GiB).")] = 1 << 20,
    request_timeout_s: Annotated[
        float | None, typer.Option(help="Longest a request may take, arrival to last token, else 504 (seconds).")
    ] = None,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(help="A file holding the bearer token of the admin routes (else $XLORA_ADMIN_TOKEN; none: off)."),
    ] = None,
    shutdown_grace_s: Annotated[
        float, typer.Option(help="On Ctrl-C / SIGTERM, how long running requests may finish (seconds).")
    ] = 10.0,
    dtype: DtypeOption = "float32",
    quantize: QuantizeOption = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (FastAPI + uvicorn)."""

    from xlora.bases.loading import load_base
    from xlora.core.model import XLoraModel
    from xlora.formats.checkpoint import detect_format
    from xlora.serve.app import create_app
    from xlora.serve.engine import Engine

    mixtures = parse_mixtures(checkpoint, model_name)  # {model id: checkpoint dir}
    token = admin_token(admin_token_file)
    for name in mixtures:
        check_serve_options(
            host, port, max_batch, max_queue, batch_wait_ms, reuse_scalings_after, name, max_body_bytes, dtype,
            quantize, request_timeout_s, shutdown_grace_s,
        )  # fmt: skip
    device = pick_device(device)
    for path in mixtures.values():
        detect_format(path)  # not a checkpoint: say so before the base loads
    model_base, tokenizer = load_base(base, device=device, dtype=dtype, quantization=quantize)
    from xlora.bases.sharing import shared_copy

    pristine = shared_copy(model_base)  # never wrapped: mixtures loaded later copy it (the same weights)

    def load(path: Path, each=None) -> Engine:
        model = XLoraModel.from_pretrained(each if each is not None else shared_copy(pristine), checkpoint_path(path))
        return Engine(
            model,
            tokenizer,
            max_batch=max_batch,
            max_queue=max_queue,
            reuse_scalings_after=reuse_scalings_after,
            batch_wait_ms=batch_wait_ms,
        )

    engines = {}
    for index, (name, path) in enumerate(mixtures.items()):
        engines[name] = load(path, model_base if index == 0 else None)  # one set of base weights
        experts = ", ".join(engines[name].model.expert_names)
        out.print(f"serving {name} ({experts}) on http://{host}:{port}/v1", highlight=False)
    app_ = create_app(
        engines, max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s, admin_token=token, loader=load
    )
    run_until_signal(app_, engines, host, port, shutdown_grace_s)
