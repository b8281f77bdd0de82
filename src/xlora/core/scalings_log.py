"""A log of the scalings the classifier predicted, bucketed by sequence length and flushable to disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


class ScalingsLog:
    """Entries are detached CPU tensors `[B, T, L, N]`, one per classifier call, in call order."""

    def __init__(self) -> None:
        self.enabled = False
        self.entries: list[torch.Tensor] = []

    def add(self, scalings: torch.Tensor) -> None:
        if self.enabled:
            self.entries.append(scalings.detach().float().cpu())

    def bucketed(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """seq_len -> (positions in the log, tensors), as PEFT's `get_bucketed_scalings_log`."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, s in enumerate(self.entries):
            positions, tensors = buckets.setdefault(s.shape[1], ([], []))
            positions.append(i)
            tensors.append(s)
        return buckets

    def flush(self, path: str | os.PathLike[str], expert_names: list[str], modules: list[str]) -> Path:
        """Write `<path>.npz` (one array per sequence length, entries concatenated on the batch axis)
        and `<path>-mapping.json` (which log entries and batch rows each array holds, expert and
        module names); then clear the log. Returns the npz path."""
        base = Path(path)
        if base.suffix == ".npz":
            base = base.with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        mapping: dict[str, list[dict[str, int]]] = {}
        for seq_len, (positions, tensors) in self.bucketed().items():
            key = f"seq_len_{seq_len}"
            arrays[key] = torch.cat(tensors, 0).numpy()  # [sum B, T, L, N]
            mapping[key] = [{"log_index": p, "batch_size": int(t.shape[0])} for p, t in zip(positions, tensors)]
        npz_path = base.with_name(base.name + ".npz")
        tmp = base.with_name(f".{base.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, npz_path)
        meta = {
            "format": "xlora-scalings-log/1",
            "shape": "[batch, seq_len, n_adapted_modules, n_experts]",
            "expert_names": expert_names,
            "adapted_modules": modules,
            "n_entries": len(self.entries),
            "arrays": mapping,
        }
        map_path = base.with_name(base.name + "-mapping.json")
        tmp_json = map_path.with_name(f".{map_path.name}.tmp-{os.getpid()}")
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_json, map_path)
        self.entries.clear()
        return npz_path


def load_scalings_log(path: str | os.PathLike[str]) -> tuple[list[torch.Tensor], dict]:
    """Read a flushed log back: the entries in their original order, and the mapping metadata."""
    base = Path(path)
    if base.suffix == ".npz":
        base = base.with_suffix("")
    map_path = base.with_name(base.name + "-mapping.json")
    npz_path = base.with_name(base.name + ".npz")
    for p in (npz_path, map_path):  # the file the user names first
        if not p.is_file():
            raise FileNotFoundError(f"{p}: scalings log file not found (write it with flush_log_scalings)")
    from xlora.core.config import read_json_object

    meta = read_json_object(map_path)  # errors name the file
    entries: dict[int, torch.Tensor] = {}
    try:
        with np.load(npz_path, allow_pickle=False) as data:  # arrays only, never objects
            for key, rows in meta["arrays"].items():
                arr = torch.from_numpy(data[key])
                start = 0
                for row in rows:
                    entries[row["log_index"]] = arr[start : start + row["batch_size"]]
                    start += row["batch_size"]
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{map_path}: does not describe {npz_path.name} (missing or wrong entry {e})") from None
    return [entries[i] for i in sorted(entries)], meta
