"""Per-chain mechanics labels from the anisotropic network model, and their JSON cache.

Two labels per chain, both elastic-network proxies (a C-alpha ANM with uniform springs), not steered
molecular dynamics or measured forces:

- `frequency`: sqrt of the lowest non-trivial Hessian eigenvalue, the slowest collective motion, in
  units of sqrt(gamma / mass) with every residue's mass 1 (gamma = 1 here, so the unit is 1).
- `stiffness`: the effective spring constant between the first and last C-alpha along the line joining
  them (Eyal & Bahar 2008, as ProDy's `calcMechStiff`, over all 3L - 6 modes), in units of gamma; it is
  the resistance of the network to pulling the termini apart, the elastic analogue of an AFM pull.

Normalisation: none beyond the model's (gamma = 1, unit masses, unit-norm eigenvectors; kT cancels in
the stiffness): values are raw, comparable between chains built with the same cutoff. Chains whose
network has more than 6 zero modes (parts farther apart than the cutoff, or a trace broken by periodic
boundaries) have no label and are listed as dropped.

Tie to chain length, measured on the real chains (MDAnalysisTests 2.11.0 data, 30-400 residues, cutoff
15 A; `python benchmarks/protein_mechanics.py`): n = 70 labelled chains (1 dropped: adk_oplsaa.pdb, whose
trace is cut by periodic boundaries), Pearson r with length: stiffness +0.19, frequency -0.21 (log
stiffness +0.20). Both labels are only weakly tied to length. Typical values: stiffness median 10.4
(quartiles 8.4-11.6, range 0.33-15.2), frequency median 0.80 (quartiles 0.30-0.96, range 0.013-1.27).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xlora.science.proteins.anm import chain_mechanics
from xlora.science.proteins.structures import Chain

CACHE_FORMAT = "xlora-protein-mechanics"
CACHE_VERSION = 1
FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "source": str,
    "sequence": str,
    "length": int,
    "frequency": (int, float),
    "stiffness": (int, float),
}


class MechanicsCacheError(ValueError):
    """A mechanics cache file that cannot be read back (corrupt, truncated or of another format)."""


@dataclass
class LabelTable:
    """The labelled chains and the ids of those dropped for a disconnected network."""

    cutoff: float
    labels: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def label_table(chains: Sequence[Chain], cutoff: float = 15.0) -> LabelTable:
    """Label every chain whose ANM network is connected; list the others as dropped."""
    table = LabelTable(cutoff)
    for chain in chains:
        m = chain_mechanics(chain.ca, cutoff)
        if m is None:
            table.dropped.append(chain.id)
            continue
        table.labels.append(
            {
                "id": chain.id,
                "source": chain.source,
                "sequence": chain.sequence,
                "length": len(chain.sequence),
                "frequency": m.frequency,
                "stiffness": m.stiffness,
            }
        )
    return table


def mechanics_labels(chains: Sequence[Chain], cutoff: float = 15.0) -> list[dict[str, Any]]:
    """Per chain {id, source, sequence, length, frequency, stiffness}, connected networks only."""
    return label_table(chains, cutoff).labels


def length_correlations(labels: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Pearson r of each label with chain length, and n: how much a label is just a size proxy."""
    if len(labels) < 3:
        raise ValueError(f"length correlations: need at least 3 labelled chains, got {len(labels)}")
    length = np.array([row["length"] for row in labels], dtype=np.float64)  # [n]
    out: dict[str, float] = {"n": float(len(labels))}
    for name in ("stiffness", "frequency"):
        values = np.array([row[name] for row in labels], dtype=np.float64)  # [n]
        out[name] = float(np.corrcoef(length, values)[0, 1])
    return out


def write_cache(path: Path, table: LabelTable) -> None:
    """Write the label table as JSON atomically: a temporary sibling, then os.replace."""
    path = Path(path)
    data = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "cutoff": table.cutoff,
        "labels": table.labels,
        "dropped": table.dropped,
    }
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_row(row: Any, index: int) -> dict[str, Any]:
    """One cached label row, with every field present, of its type and finite; else why not."""
    if not isinstance(row, dict):
        raise ValueError(f"labels[{index}] is not an object")
    for name, kind in FIELDS.items():
        value = row.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"labels[{index}].{name} is missing or not {getattr(kind, '__name__', 'a number')}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"labels[{index}].{name} is not finite")
    if row["length"] != len(row["sequence"]):
        raise ValueError(f"labels[{index}]: length {row['length']} != sequence length {len(row['sequence'])}")
    return row


def parse_cache(data: Any) -> LabelTable:
    """The label table of a decoded cache object; ValueError saying what is wrong."""
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise ValueError(f"not a {CACHE_FORMAT} file")
    if data.get("version") != CACHE_VERSION:
        raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
    cutoff, labels, dropped = data.get("cutoff"), data.get("labels"), data.get("dropped")
    if not isinstance(cutoff, (int, float)) or isinstance(cutoff, bool) or not cutoff > 0:
        raise ValueError("cutoff is missing or not a positive number")
    if not isinstance(labels, list) or not isinstance(dropped, list) or not all(isinstance(d, str) for d in dropped):
        raise ValueError("labels or dropped is not a list")
    return LabelTable(float(cutoff), [check_row(row, i) for i, row in enumerate(labels)], list(dropped))


def read_cache(path: Path) -> LabelTable:
    """Read a label table written by write_cache; MechanicsCacheError naming the file when it is corrupt."""
    path = Path(path)
    try:
        return parse_cache(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise MechanicsCacheError(f"{path}: corrupt mechanics cache ({e}); delete it to rebuild") from None


def cached_label_table(path: Path, chains: Sequence[Chain], cutoff: float = 15.0) -> LabelTable:
    """The label table of `chains` from the cache at `path`, computed and written there when absent."""
    path = Path(path)
    if path.exists():
        table = read_cache(path)
        if table.cutoff != cutoff:
            raise MechanicsCacheError(f"{path}: cache built with cutoff {table.cutoff}, asked for {cutoff}")
        cached = {row["id"] for row in table.labels} | set(table.dropped)
        if cached != {chain.id for chain in chains}:
            raise MechanicsCacheError(f"{path}: cache built from other chains; delete it to rebuild")
        return table
    table = label_table(chains, cutoff)
    write_cache(path, table)
    return table
