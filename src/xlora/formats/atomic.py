"""Writes that never lose data: atomic directory replacement, recovery after a kill, destination checks.

A directory is replaced in steps: write `.NAME.tmp-*`, rename it to `.NAME.new-*` (complete from
then on), move the old `NAME` to `.NAME.old-*`, rename the new one to `NAME`, delete the old one.
Whatever fails, `NAME` is afterwards the old directory, untouched, or the complete new one;
`recover_directory` finishes a replacement a kill interrupted. Leftovers are named exactly
`.NAME.KIND-PID-START-HEX8` (the writer's pid and process start time, so a reused pid is not mistaken
for it) and hold the saver's marker file: only such folders, of dead processes, are ever swept or
adopted; a user's `.NAME.old-backup/` is never touched. One save per destination at a time: an OS
lock (`hold_lock`, POSIX flock) on `.NAME.lock`. `check_output` is the destination check of every writer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from xlora.core.config import CheckpointError, WriteError, read_json_object
from xlora.formats.locks import BusyError, destination_lock, hold_lock  # noqa: F401 - BusyError re-exported

CONFIG_NAME = "xlora_config.json"  # the native checkpoint's config (io.py's layout)


MARKER = ".xlora-save.json"  # written by the saver into every folder it makes beside the destination
KINDS = ("tmp", "new", "old")
_LIVE_TAGS: set[str] = set()  # tags of this process's replacements in progress (other threads' too)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a permission error means it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (Linux /proc), to tell a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _leftover_re(path: Path) -> re.Pattern[str]:
    """The exact names of the saver's folders beside `path`: `.NAME.KIND-PID-START-HEX8`."""
    return re.compile(rf"\.{re.escape(path.name)}\.(tmp|new|old)-(\d+)-(\d+)-([0-9a-f]{{8}})")


def _write_marker(folder: Path, path: Path, kind: str, tag: str) -> None:
    """Mark `folder` as the saver's own `kind` leftover of `path` (what recovery and sweeps require).

    Written in place, not renamed: a marker cut by a kill is unreadable, so the folder counts as not
    ours and is left alone (never deleted, never adopted)."""
    data = {"saver": "xlora", "destination": path.name, "kind": kind, "tag": tag}
    (folder / MARKER).write_text(json.dumps(data) + "\n")


def _marker_of(folder: Path) -> dict:
    """The saver's marker inside `folder` ({} when absent, unreadable or a symlink)."""
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return {}
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _leftover(candidate: Path, path: Path) -> tuple[str, int, str, str] | None:
    """(kind, pid, start, tag) when `candidate` is a folder the saver made for `path`, else None.

    Ours means: the exact name pattern, a real folder (not a symlink), and our marker inside naming
    the same destination, kind and tag. A user's `.ck.old-backup/` (or any look-alike) is never ours."""
    m = _leftover_re(path).fullmatch(candidate.name)
    if m is None or candidate.is_symlink() or not candidate.is_dir():
        return None
    kind, pid, start, rand = m.groups()
    tag = f"{pid}-{start}-{rand}"
    marker = _marker_of(candidate)
    expected = {"saver": "xlora", "destination": path.name, "kind": kind, "tag": tag}
    if any(marker.get(k) != v for k, v in expected.items()):
        return None
    return kind, int(pid), start, tag


def leftovers(path: Path, kind: str) -> list[Path]:
    """The saver's own leftovers of `path` of one kind ("tmp", "new" or "old"), oldest first."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.glob(f".{path.name}.{kind}-*") if (_leftover(p, path) or ("",))[0] == kind]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _owner_alive(leftover: Path, path: Path) -> bool:
    """Is the process that made this leftover still running? (A reused pid with another start time is not
    the owner; this process's own leftovers count as alive only while their replacement is running.)"""
    parsed = _leftover(leftover, path)
    if parsed is None:
        return True  # not ours: never touched
    _, pid, start, tag = parsed
    if pid == os.getpid():
        return tag in _LIVE_TAGS
    return _pid_alive(pid) and start == _start_time(pid)


def _promote(src: Path, path: Path) -> bool:
    """Rename the saver's leftover `src` to `path` and drop its marker; False if another reader won."""
    try:
        os.replace(src, path)
    except OSError:
        if path.exists():
            return False
        raise
    (path / MARKER).unlink(missing_ok=True)
    return True


def recover_directory(path: Path) -> str | None:
    """Finish or undo a replacement that a crash interrupted, then sweep the saver's stale leftovers.

    `atomic_directory` replaces `path` in steps: write `.NAME.tmp-*`, rename it to `.NAME.new-*`
    (now complete), move the old `path` to `.NAME.old-*`, rename the new one to `path`. A kill
    between the last two steps leaves no `path`: the newest complete `.new-*` is put in place (else
    the newest `.old-*` is put back). Only folders the saver marked as its own are adopted or swept:
    a user's folder of a similar name is never touched. Returns what was done ("new" or "old") or None.
    """
    path = Path(path)
    action = None
    if not path.exists():
        for kind in ("new", "old"):
            candidates = [p for p in leftovers(path, kind) if not _owner_alive(p, path)]
            if candidates and _promote(candidates[-1], path):
                action = kind
                break
    if path.exists():
        remove_leftovers(path)
    return action


def remove_leftovers(path: Path) -> None:
    """Delete the saver's own leftovers of `path` whose process is gone (never a user's folder)."""
    for kind in KINDS:
        for leftover in leftovers(path, kind):
            if not _owner_alive(leftover, path):
                remove_marked(leftover)


def remove_marked(folder: Path) -> None:
    """Delete a folder the saver made, its marker last: a kill midway leaves it still marked, so the
    next save sweeps it (deleting the marker first left unmarked copies nothing would ever remove)."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for child in folder.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    with suppress(OSError):
        folder.rmdir()


def move_aside(path: Path) -> Path:
    """Rename `path` to a marked `.NAME.old-*` leftover of this process (swept by the next recovery)."""
    path = Path(path)
    tag = _tag()
    aside = path.parent / f".{path.name}.old-{tag}"
    _set_aside(path, aside, tag)
    return aside


def _set_aside(path: Path, aside: Path, tag: str) -> None:
    """Move `path` to its `.old-*` name, marked first: a kill right after the rename leaves a marked leftover
    (a kill before it, a stray marker inside `path`, which nothing reads and the next save replaces)."""
    _write_marker(path, path, "old", tag)
    try:
        os.replace(path, aside)
    except BaseException:
        (path / MARKER).unlink(missing_ok=True)
        raise


def _tag() -> str:
    """A fresh leftover tag of this process: PID-START-HEX8."""
    return f"{os.getpid()}-{_start_time(os.getpid())}-{uuid.uuid4().hex[:8]}"


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


def _overlaps(dest: Path, read: Path) -> bool:
    """Whether writing `dest` could change `read`: the same path, inside it, or containing it."""
    dest, read = dest.resolve(), read.resolve()
    return dest == read or dest.is_relative_to(read) or read.is_relative_to(dest)


def check_output(
    path: str | os.PathLike[str],
    overwrite: bool,
    reads: Iterable[str | os.PathLike[str] | None] = (),
    directory: bool = False,
    replaces: str | None = None,
) -> Path:
    """The destination check of every writer (library and CLI), before any work.

    Refuses, with errors naming the path as given: a destination that is, lies inside or contains
    anything the command reads (`reads`: checkpoints, base models, experts, data; even with
    `overwrite`), an existing destination without `overwrite` (--overwrite), and everything
    `check_destination` (a folder: `directory=True`, of kind `replaces`) or `check_file_destination`
    (a file) refuses.
    """
    given = str(path)
    for read in reads:
        if read is not None and _overlaps(Path(path), Path(read)):
            raise CheckpointError(
                f"{given}: is, lies inside or contains {read}, which this command reads; choose a destination "
                "outside it"
            )
    if directory:
        return check_destination(path, overwrite=overwrite, replaces=replaces)
    check_file_destination(path)
    if (Path(path).exists() or Path(path).is_symlink()) and not overwrite:
        raise CheckpointError(f"{given}: already exists (pass overwrite=True / --overwrite to replace it)")
    return Path(path)


@contextmanager
def atomic_directory(path: Path, overwrite: bool, replaces: str | None = "xlora") -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on failure it vanishes.

    Whatever fails (the work, a rename, a kill), `path` is afterwards either the old directory,
    untouched, or the complete new one; `recover_directory` finishes a replacement a kill interrupted.
    The destination is locked for the whole replacement: a concurrent save to it fails at once with
    "another save to PATH is running (pid ...)" (see `hold_lock`), never with a half-done rename.
    """
    path = Path(path)
    check_destination(path, overwrite=True, replaces=replaces)
    path.parent.mkdir(parents=True, exist_ok=True)
    busy = f"{path}: another save to it is running; wait for it to finish or save elsewhere"
    with hold_lock(destination_lock(path), busy):
        recover_directory(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
        tag = _tag()
        _LIVE_TAGS.add(tag)
        try:
            yield from _replace(path, tag)
        except OSError as e:
            if e.filename is not None:  # it names its file already
                raise
            raise WriteError(f"{path}: cannot write it ({e.strerror or e}); it is unchanged", e.errno) from None
        finally:
            _LIVE_TAGS.discard(tag)


def _replace(path: Path, tag: str) -> Iterator[Path]:
    """The steps of `atomic_directory` (lock held): marked tmp -> marked new -> swap -> drop the old."""
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        _write_marker(tmp, path, "tmp", tag)
        yield tmp
        new = path.parent / f".{path.name}.new-{tag}"
        _write_marker(tmp, path, "new", tag)  # complete: recovery may adopt it once renamed
        os.replace(tmp, new)
        tmp = new
        if path.exists():
            old = path.parent / f".{path.name}.old-{tag}"
            _set_aside(path, old, tag)
            try:
                os.replace(new, path)
            except BaseException:
                os.replace(old, path)  # put the old directory back before reporting the failure
                (path / MARKER).unlink(missing_ok=True)
                raise
            (path / MARKER).unlink(missing_ok=True)
            remove_marked(old)
        else:
            os.replace(new, path)
            (path / MARKER).unlink(missing_ok=True)
    except BaseException:
        remove_marked(tmp)
        raise
