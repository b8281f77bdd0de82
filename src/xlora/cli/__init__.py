"""The `xlora` command: one typer app, a module per command group."""

from xlora.cli import design, science, serve, train  # noqa: F401 - each registers its commands on `app`
from xlora.cli.app import app, checkpoint_path, main

__all__ = ["app", "checkpoint_path", "main"]
