"""Writes that never lose data: atomic directory replacement, recovery after a kill, destination checks.

A directory is replaced in steps: write `.NAME.tmp-*`, rename it to `.NAME.new-*` (complete from
then on), move the old `NAME` to `.NAME.old-*`, rename the new one to `NAME`, delete the old one.
Whatever fails, `NAME` is afterwards the old directory, untouched, or the complete new one;
`recover_directory` finishes a replacement a kill interrupted. Leftovers carry the writer's pid and
process start time, so those of dead processes are swept and a reused pid is not mistaken for them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xlora.core.config import CheckpointError, read_json_object

CONFIG_NAME = "xlora_config.json"  # the native checkpoint's config (io.py's layout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _siblings(path: Path, kind: str) -> list[Path]:
    """Our leftovers of `path` of one kind ("tmp", "new" or "old"), oldest first."""
    found = [p for p in path.parent.glob(f".{path.name}.{kind}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (Linux /proc), to tell a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _owner_alive(leftover: Path) -> bool:
    """Leftovers are named `.NAME.KIND-PID-START-RANDOM`: is the process that made this one still running?
    (A pid that now belongs to a process started at another time is not the owner.)"""
    parts = leftover.name.rsplit(".", 1)[-1].split("-")
    if len(parts) < 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid() or not _pid_alive(pid):
        return False
    return len(parts) < 4 or parts[2] == _start_time(pid)


def recover_directory(path: Path) -> str | None:
    """Finish or undo a replacement that a crash interrupted, then sweep stale leftovers.

    `atomic_directory` replaces `path` in steps: write `.NAME.tmp-*`, rename it to `.NAME.new-*`
    (now complete), move the old `path` to `.NAME.old-*`, rename the new one to `path`. A kill
    between the last two steps leaves no `path`: the newest complete `.new-*` is put in place (else
    the newest `.old-*` is put back). Returns what was done ("new" or "old") or None.
    """
    path = Path(path)
    action = None
    if not path.exists():
        for kind in ("new", "old"):
            candidates = [p for p in _siblings(path, kind) if not _owner_alive(p)]
            if candidates:
                src = candidates[-1]
                src = src / "x" if (src / "x").is_dir() else src  # old layout kept the directory in old/x
                os.replace(src, path)
                action = kind
                break
    if path.exists():
        for kind in ("tmp", "new", "old"):
            for leftover in _siblings(path, kind):
                if not _owner_alive(leftover):
                    shutil.rmtree(leftover, ignore_errors=True)
    return action


# What an existing directory must be for a save to replace it (an empty directory always may be).
REPLACEABLE = {
    "xlora": "an X-LoRA checkpoint",
    "adapter": "a PEFT adapter directory",
    "run-checkpoint": "a training checkpoint",
}


def _is_kind(path: Path, kind: str) -> bool:
    if kind == "xlora":
        if (path / CONFIG_NAME).is_file():
            return True
        try:
            return str(read_json_object(path / "adapter_config.json").get("peft_type", "")).upper() == "XLORA"
        except (OSError, ValueError):
            return False
    if kind == "adapter":
        return (path / "adapter_config.json").is_file()
    return (path / "meta.json").is_file() or (path / "state.pt").is_file()


def check_destination(path: str | os.PathLike[str], overwrite: bool = True, replaces: str | None = "xlora") -> Path:
    """Refuse, before any work, a destination we could not write or should not replace.

    Errors name the path as given: `.` or any folder containing the current directory, a parent that
    is a file, an existing file, an existing directory without `overwrite`, an existing directory
    that is not empty and not of the kind being saved (`replaces`, see REPLACEABLE: replacing it
    would delete the user's other files; None: a folder we only write into), a read-only parent.
    """
    given = str(path)
    path = Path(path)
    resolved = path.resolve()
    if resolved == Path(resolved.anchor) or Path.cwd().resolve().is_relative_to(resolved):
        raise CheckpointError(f"{given}: refusing to write over the current directory or one containing it")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{given}: exists and is not a directory")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{given}: already exists (pass overwrite=True / --overwrite to replace it)")
    if replaces is not None and path.is_dir() and any(path.iterdir()) and not _is_kind(path, replaces):
        raise CheckpointError(
            f"{given}: exists, is not empty and is not {REPLACEABLE[replaces]}; refusing to replace it "
            "(that would delete its files): choose a new or empty folder"
        )
    parent = resolved.parent
    for ancestor in [parent, *parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise CheckpointError(f"{given}: {ancestor} is a file, not a directory")
            try:  # a real probe: access() says yes to root even on read-only mounts
                os.rmdir(tempfile.mkdtemp(prefix=".xlora-write-probe-", dir=ancestor))
            except OSError as e:
                raise CheckpointError(f"{given}: cannot write in {ancestor} ({e.strerror or e})") from None
            break
    return path


def check_file_destination(path: str | os.PathLike[str]) -> Path:
    """A file we are about to write: not a directory, its parent creatable and writable (errors name it)."""
    given, path = str(path), Path(path)
    if path.is_dir():
        raise CheckpointError(f"{given}: is a directory; expected a file name")
    check_destination(path.parent / f".{path.name}.probe", overwrite=True, replaces=None)
    return path


@contextmanager
def atomic_directory(path: Path, overwrite: bool, replaces: str = "xlora") -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on failure it vanishes.

    Whatever fails (the work, a rename, a kill), `path` is afterwards either the old directory,
    untouched, or the complete new one; `recover_directory` finishes a replacement a kill interrupted.
    """
    path = Path(path)
    check_destination(path, overwrite=True, replaces=replaces)
    recover_directory(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{_start_time(os.getpid())}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        new = path.parent / f".{path.name}.new-{tag}"
        os.replace(tmp, new)  # complete from here on: recover_directory may promote it
        tmp = new
        _kill_point("new")
        if path.exists():
            old = path.parent / f".{path.name}.old-{tag}"
            os.replace(path, old)
            _kill_point("swap")
            try:
                os.replace(new, path)
            except BaseException:
                os.replace(old, path)  # put the old directory back before reporting the failure
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(new, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _kill_point(name: str) -> None:
    """Test hook: SIGKILL this process at a named step of a replacement (XLORA_TEST_KILL_SAVE_AT)."""
    if os.environ.get("XLORA_TEST_KILL_SAVE_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
