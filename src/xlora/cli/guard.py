"""The error guard of the `xlora` command line: one `error: ...` line for bad input, never a traceback.

`GuardedTyper.command` wraps every command callback, wherever it is registered (cli.py,
cli_train.py, cli_science.py), in `one_line_errors`: an expected error (bad input: our
ExpertError / CheckpointError / XLoraConfigError / DataError, any ValueError or OSError,
safetensors' SafetensorError, JSON and decoding errors, a tokenizer's chat-template error) becomes
one line `error: ...` on stderr and exit code 2. Internal faults (RuntimeError from torch,
AssertionError, ...) keep their traceback. It also hides typer's `<bool>` after flags in --help.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

err = Console(stderr=True)
EXIT_ERROR = 2


def print_error(message: str) -> None:
    """Print `error: <message>` as one line (line breaks folded)."""
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    err.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True, highlight=False)


def fail(message: str) -> None:
    """Print `error: <message>` as one line and exit with code 2."""
    print_error(message)
    raise typer.Exit(code=EXIT_ERROR)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean bad input (a file, a value, an option), not a bug in xlora."""
    import csv
    import zipfile

    classes: list[type[BaseException]] = [
        ValueError,  # includes json.JSONDecodeError, UnicodeDecodeError and all our error classes
        OSError,
        csv.Error,
        # (no pickle classes: every torch.load is weights_only=True inside a reader that wraps its errors)
        zipfile.BadZipFile,  # a corrupt .npz
    ]
    try:
        from safetensors import SafetensorError

        classes.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    try:
        from jinja2 import TemplateError  # a tokenizer's chat template refusing the input

        classes.append(TemplateError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(classes)


def error_line(e: BaseException) -> str:
    """The message for `e` (`_fail` folds it to one line); classes from outside xlora keep their name."""
    message = str(e).strip()
    cls = type(e)
    if not message:
        return cls.__name__
    if cls is ValueError or cls.__module__.split(".")[0] == "xlora":
        return message
    return f"{cls.__name__}: {message}"


def _show_warning(original: Callable[..., None]) -> Callable[..., None]:
    """`warnings.showwarning` that prints our data warnings as one `warning: ...` line."""

    def show(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if category.__name__ == "DataWarning" and category.__module__.startswith("xlora"):
            err.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True, highlight=False)
        else:
            original(message, category, filename, lineno, file, line)

    return show


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command callback so that expected errors end it with one `error: ...` line (exit 2).

    `functools.wraps` keeps the name, docstring and `__wrapped__`, which typer follows for the
    signature and the type hints (resolved in the wrapped function's own module)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        original = warnings.showwarning
        warnings.showwarning = _show_warning(original)
        try:
            return command(*args, **kwargs)
        except Exception as e:
            if not isinstance(e, expected_errors()):
                raise
            fail(error_line(e))
        finally:
            warnings.showwarning = original

    return run


def _hide_flag_types(command: TyperCommand | TyperGroup, ctx: Any) -> None:
    """Typer's rich help prints a `<bool>` type after every flag (`--help <bool>`), as if it took a
    value; an empty metavar removes that column entry (flags never show a metavar otherwise)."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class GuardedCommand(TyperCommand):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        _hide_flag_types(self, ctx)
        return super().format_help(ctx, formatter)


def empty_option(args: list[str]) -> str | None:
    """The first `--option` given an empty value (`--out ""` or `--out=`), else None. No option of
    ours means anything by an empty string, and for a path typer would read it as the working folder."""
    for i, arg in enumerate(args):
        if arg == "--":
            return None
        if arg.startswith("--") and arg.endswith("=") and len(arg) > 3:
            return arg[:-1]
        if arg == "":
            after = args[i - 1] if i > 0 else ""
            option = (after.startswith("--") and "=" not in after) or (len(after) == 2 and after[0] == "-")
            return after if option else "an argument"
    return None


class GuardedGroup(TyperGroup):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        _hide_flag_types(self, ctx)
        return super().format_help(ctx, formatter)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Click's own errors (a bad option value, an unknown option) as one `error: ...` line too,
        not a boxed panel: every error of every command looks the same (exit code 2)."""
        try:  # typer >= 0.29 carries its own copy of click
            from typer._click import exceptions as click_errors
        except ImportError:  # pragma: no cover - older typer uses click itself
            from click import exceptions as click_errors

        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        given = kwargs.get("args", args[0] if args else None)
        empty = empty_option(sys.argv[1:] if given is None else list(given))
        if empty is not None:  # typer turns "" into Path("."): the working directory, silently
            print_error(f"{empty}: must not be empty")
            sys.exit(EXIT_ERROR)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.UsageError as e:
            message = e.format_message()
            if message:  # empty: no arguments at all, and the help was just shown
                command = e.ctx.command_path if e.ctx is not None else None
                print_error(f"{message} (see {command} --help)" if command else message)
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            print_error(e.format_message())
            sys.exit(e.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


class GuardedTyper(typer.Typer):
    """A Typer app whose commands, wherever they are registered, run under `one_line_errors`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", GuardedGroup)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        kwargs.setdefault("cls", GuardedCommand)
        register = super().command(*args, **kwargs)

        def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
            register(one_line_errors(f))
            return f  # the plain function stays callable from Python

        return decorator
