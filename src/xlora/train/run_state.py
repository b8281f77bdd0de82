"""A training run directory: atomic checkpoints, recovery after a kill, and the run's identity.

    OUT-run/
      run.json          what the run is: its training arguments and identity (model, experts, data)
      metrics.jsonl     one row per step (rows past the resumed step are dropped on resume)
      checkpoint/       trainable.safetensors, state.pt (optimiser, scheduler, RNG), meta.json (step)

Nothing here unpickles code: `state.pt` is read with `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers, so a crafted file from someone else cannot run anything.
`meta.json` is written last, so a checkpoint folder that has it is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xlora.core.checks import load_tensors_only
from xlora.formats.atomic import KINDS, MARKER, leftovers, move_aside, remove_leftovers
from xlora.formats.locks import hold_lock
from xlora.formats.native import atomic_directory, checkpoint_file

CHECKPOINT = "checkpoint"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
META = "meta.json"
RUN_FILE = "run.json"
METRICS = "metrics.jsonl"
LOCK = "run.lock"  # held (flock) for a run's life; records the holder's pid, host and start time


class RunError(ValueError):
    """A run directory cannot be resumed as asked; the message says what differs or is missing."""


# ---------------------------------------------------------------------- the run's lock


def run_lock(run: Path) -> AbstractContextManager[None]:
    """Lock `run` for a run's whole life: a second run into it fails at once with one line naming the holder.

    An OS lock (flock on `run/run.lock`): the kernel drops it when the holder dies, so a killed run
    never blocks the next one (its --resume included). Re-entrant: the CLI takes it before loading
    the model, the library again around the training."""
    busy = f"{run}: another training run is using this run directory; wait for it, or use another --out / --run-dir"
    return _lock_made_folder(Path(run), busy)


@contextmanager
def _lock_made_folder(run: Path, busy: str) -> Iterator[None]:
    """`hold_lock` in `run`, creating it if needed; a folder made here and left empty (the run failed
    before writing anything, e.g. on a bad option) is removed again, so a refused run leaves nothing."""
    made = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    try:
        with hold_lock(run / LOCK, busy):
            yield
    finally:
        if made:
            with suppress(OSError):
                run.rmdir()  # only if empty


# ---------------------------------------------------------------------- identity


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_fingerprint(folder: Path, names: Iterable[str]) -> str:
    """sha256 over the named files of a folder that exist (an adapter's config and weights)."""
    h = hashlib.sha256()
    for name in sorted(names):
        if (Path(folder) / name).is_file():
            h.update(name.encode() + b"\0" + sha256_file(Path(folder) / name).encode())
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """sha256 over every example's token ids and labels, in order (what the run trains on); routing labels
    are left out (`routes_fingerprint`: they matter only to a run with a routing prior)."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        ex = dataset[i]
        h.update(json.dumps([list(ex.input_ids), list(ex.labels)]).encode())
    return h.hexdigest()[:16]


def routes_fingerprint(dataset) -> str:
    """sha256 over every example's routing label ("expert"), in order."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        h.update(json.dumps(getattr(dataset[i], "route", None)).encode())
    return h.hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def identity_changes(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every field that differs between two run descriptions."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def check_run_identity(run: Path, identity: dict) -> None:
    """Refuse to resume `run` with anything that would mix two runs (arguments, model, experts, data)."""
    path = checkpoint_file(run, RUN_FILE, "run directory")
    if not path.is_file():
        raise RunError(f"{path}: missing; cannot tell which run this checkpoint belongs to (start a new run dir)")
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: unreadable ({e})") from None
    changes = identity_changes(stored, json.loads(json.dumps(identity)))
    if changes:
        raise RunError(
            f"{run}: --resume with other settings than the run was started with would mix two runs; "
            "changed: " + "; ".join(changes) + " (use the original settings, or a new --run-dir / --out)"
        )


def write_run_identity(run: Path, identity: dict) -> None:
    from xlora.core.config import write_text_atomic

    Path(run).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(run) / RUN_FILE, json.dumps(identity, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------- checkpoints


def write_checkpoint(run: Path, step: int, weights: dict[str, torch.Tensor], state: dict) -> None:
    """Write `run/checkpoint/` atomically (the old one stays until the new one is complete)."""
    with atomic_directory(Path(run) / CHECKPOINT, overwrite=True, replaces="run-checkpoint") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        (tmp / META).write_text(json.dumps({"step": int(step), "format": 1}) + "\n")


def _step_of(folder: Path) -> int | None:
    """The step of a complete checkpoint folder (it has meta.json), else None."""
    try:
        meta = json.loads((folder / META).read_text())
        step = meta["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    if not ((folder / WEIGHTS).is_file() and (folder / STATE).is_file()):
        return None
    return step


def find_checkpoint(run: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint of `run`, recovering it from a save a kill interrupted.

    Candidates are `checkpoint/` and the saver's own marked leftovers of an interrupted replacement
    (`.checkpoint.tmp-*` with meta.json, `.checkpoint.new-*`, `.checkpoint.old-*`; see
    `formats.atomic.leftovers`: a user's look-alike folder is never adopted); the one with the
    highest step is moved to `checkpoint/` and the other leftovers are swept.
    """
    final = Path(run) / CHECKPOINT
    candidates = [final] if final.is_dir() else []
    for kind in KINDS:
        candidates += leftovers(final, kind)
    steps = [(s, c) for c in candidates if (s := _step_of(c)) is not None]
    if not steps:
        return None
    step, best = max(steps, key=lambda sc: (sc[0], sc[1] == final))
    if best != final:
        if final.exists():
            move_aside(final)  # a marked leftover of this process: swept below
        os.replace(best, final)
        (final / MARKER).unlink(missing_ok=True)
    remove_leftovers(final)
    return final, step


def read_checkpoint_files(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, optimiser/scheduler/RNG state) of a checkpoint folder; never runs code."""
    weights_file = checkpoint_file(folder, WEIGHTS, "run checkpoint")
    state_file = checkpoint_file(folder, STATE, "run checkpoint")
    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise RunError(f"{weights_file}: not a readable safetensors file ({e})") from None
    try:
        state = load_tensors_only(state_file)
    except ValueError as e:
        raise RunError(f"{e} (a run state holds only tensors and plain values)") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "torch_rng", "python_rng"} <= set(state):
        raise RunError(f"{folder / STATE}: expected the optimiser, scheduler and RNG state of an xlora run")
    return weights, state


def truncate_metrics(run: Path, step: int) -> int:
    """Drop metrics rows past `step` (written after the checkpoint a resumed run restarts from)."""
    path = checkpoint_file(run, METRICS, "run directory")
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            dropped += 1  # a line cut by the kill
            continue
        if isinstance(row_step, int) and row_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        from xlora.core.config import write_text_atomic

        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped
