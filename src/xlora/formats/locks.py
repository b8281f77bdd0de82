"""One writer at a time: an OS lock (POSIX flock) on a lock file that records its holder.

A save locks `.NAME.lock` beside its destination, a training run `run.lock` in its run directory; a
second one fails at once naming the holder. The kernel drops the lock when its holder dies."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from xlora.core.config import CheckpointError, WriteError

LOCK_SUFFIX = ".lock"


class BusyError(CheckpointError):
    """Another process (or thread) holds the lock of a destination or run directory."""


_HELD: dict[tuple[str, int], list] = {}  # (lock file, thread) -> [depth, fd]: re-entrant per thread


def _holder_text(fd: int) -> str:
    """What the lock file says about its holder, as 'pid P on HOST since TIME' (or 'unknown holder')."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {data['pid']} on {data['host']} since {data['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _try_lock(lock_file: Path) -> int:
    """An fd holding an exclusive flock on `lock_file` (the file now at that path), or None if held."""
    import fcntl

    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _busy(fd)
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have unlinked the file after we opened it: lock the current one
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _busy(fd: int) -> NoReturn:
    """Raise BusyError naming the holder recorded in the lock file open at `fd` (closing it)."""
    try:
        holder = _holder_text(fd)
    finally:
        os.close(fd)
    raise BusyError(holder)


@contextmanager
def hold_lock(lock_file: Path, busy: str) -> Iterator[None]:
    """Hold an OS lock (flock) on `lock_file` for the block; the file records pid, host and start time.

    Re-entrant within a thread. A second holder fails at once with BusyError `{busy} (pid P on HOST
    since TIME)` instead of waiting: two writers of one destination are the caller's mistake, and a
    wait could hang behind a stuck process. The kernel drops the lock when its process dies, so a
    lock file left by a killed process never blocks. The holder removes the file when done.
    """
    key = (str(Path(lock_file).resolve()), threading.get_ident())
    if key in _HELD:
        _HELD[key][0] += 1
        try:
            yield
        finally:
            _HELD[key][0] -= 1
        return
    try:
        fd = _try_lock(Path(lock_file))
    except BusyError as e:
        raise BusyError(f"{busy} ({e})") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
    except OSError as e:  # a full disk: say where, and leave no lock file behind
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        os.close(fd)
        raise WriteError(f"{Path(lock_file).parent}: cannot write there ({e.strerror or e})", e.errno) from None
    _HELD[key] = [1, fd]
    try:
        yield
    finally:
        del _HELD[key]
        try:
            os.unlink(lock_file)  # while still locked: a waiter that opened it retries on the new file
        except OSError:
            pass
        os.close(fd)


def destination_lock(path: Path) -> Path:
    """The lock file of a save destination: `.NAME.lock` beside it."""
    path = Path(path)
    return path.parent / f".{path.name}{LOCK_SUFFIX}"
