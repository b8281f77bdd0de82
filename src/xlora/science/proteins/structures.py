"""Real protein chains (sequence and C-alpha trace) read offline from structure files in installed packages.

The default source is the data folder of MDAnalysisTests (PDB and mmCIF files of real proteins; located
with `importlib.util.find_spec`, never imported: its `__init__` needs MDAnalysis). Further folders, such
as one the user gives, are added by name: `structure_sources({"mine": Path("pdbs")})`.

Parsing (gemmi): first model only; alternative conformations reduced to the first; waters and ligands
ignored; a residue counts when it is one of the 20 standard amino acids and has a CA atom; a chain
holding any other amino acid (MSE, SEP, UNK, CHARMM's HSD, ...) or an unknown polymer residue is
dropped whole. The sequence is that of the observed residues (missing loops are not filled in).
Identical sequences are kept once: the first in sorted-path order, then chain order. A file gemmi cannot
read is skipped and counted, never fatal.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import gemmi

# name -> (importable package, data folder inside it, how to install it)
INSTALLED: dict[str, tuple[str, str, str]] = {
    "mdanalysistests": ("MDAnalysisTests", "data", "pip install MDAnalysisTests"),
}
DEFAULT_SOURCE = "mdanalysistests"
SUFFIXES = (".pdb", ".pdb.gz", ".ent", ".ent.gz", ".cif", ".cif.gz", ".mmcif", ".mmcif.gz")
STANDARD = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E", "GLY": "G",
    "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P", "SER": "S",
    "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V",
}  # fmt: skip


class NonStandardChain(ValueError):
    """A chain holds a residue that is not one of the 20 standard amino acids (it is dropped whole)."""


@dataclass
class Chain:
    """One protein chain: its observed standard-residue sequence and the matching C-alpha coordinates."""

    id: str  # "<source>/<path inside the source>:<chain name>", e.g. "mdanalysistests/1a28.pdb.gz:A"
    source: str
    sequence: str  # one letter per residue, standard amino acids only
    ca: np.ndarray  # [L, 3] float64, Angstrom


@dataclass
class StructureScan:
    """What a load found: the kept chains and the counts of everything skipped (for reports)."""

    chains: list[Chain] = field(default_factory=list)
    files: int = 0
    unreadable: list[str] = field(default_factory=list)  # "path: reason"
    nonstandard: int = 0  # chains dropped for a non-standard residue
    out_of_range: int = 0  # chains outside [min_length, max_length]
    duplicates: int = 0  # chains whose sequence was already kept


def installed_source(name: str) -> Path | None:
    """The data folder of one registered installed package, or None when the package is not installed."""
    package, folder, _ = INSTALLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / folder
    return path if path.is_dir() else None


def structure_sources(extra: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """The installed structure sources found, plus the user's named folders in `extra`."""
    found = {name: path for name in INSTALLED if (path := installed_source(name)) is not None}
    for name, folder in (extra or {}).items():
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: structure folder {name!r} not found")
        if name in found:
            raise ValueError(f"structure source {name!r} is already defined ({found[name]})")
        found[name] = folder
    return found


def default_sources() -> dict[str, Path]:
    """The default source (MDAnalysisTests' data), with an install hint when the package is missing."""
    path = installed_source(DEFAULT_SOURCE)
    if path is None:
        package, _, hint = INSTALLED[DEFAULT_SOURCE]
        raise FileNotFoundError(f"the {package} package (protein structures) is not installed: {hint}")
    return {DEFAULT_SOURCE: path}


def structure_files(folder: Path) -> list[Path]:
    """The structure files under `folder` (recursively), sorted by path for a deterministic order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))


def is_amino_acid(residue: gemmi.Residue, info: gemmi.ResidueInfo | None) -> bool:
    """Whether a non-standard residue is an amino acid: gemmi's table says so, or (a name gemmi does not
    know, such as CHARMM's HSD) it has the N, CA and C backbone atoms."""
    if info is not None and info.is_amino_acid():
        return True
    unknown = info is None or info.kind.name == "UNKNOWN"
    return unknown and all(residue.find_atom(a, "*") is not None for a in ("N", "CA", "C"))


def chain_residues(chain: gemmi.Chain) -> tuple[str, np.ndarray]:
    """(sequence, CA coordinates [L, 3]) of one gemmi chain; NonStandardChain when a residue is not standard."""
    import gemmi

    letters: list[str] = []
    coords: list[tuple[float, float, float]] = []
    for residue in chain:
        if residue.is_water():
            continue
        letter = STANDARD.get(residue.name)
        if letter is None:
            if is_amino_acid(residue, gemmi.find_tabulated_residue(residue.name)):
                raise NonStandardChain(residue.name)
            continue  # a ligand, ion or other hetero group beside the chain
        ca = residue.find_atom("CA", "*")
        if ca is None:
            continue
        letters.append(letter)
        coords.append((ca.pos.x, ca.pos.y, ca.pos.z))
    return "".join(letters), np.asarray(coords, dtype=np.float64).reshape(-1, 3)  # [L, 3]


def read_model(path: Path) -> gemmi.Model:
    """The first model of a structure file, alternative conformations reduced to the first."""
    import gemmi

    structure = gemmi.read_structure(str(path))
    if len(structure) == 0:
        raise ValueError("no model")
    structure.remove_alternative_conformations()
    return structure[0]


def scan_file(path: Path, label: str, scan: StructureScan, lengths: tuple[int, int], seen: set[str]) -> None:
    """Add the new in-range standard chains of one file to `scan` (an unreadable file is counted)."""
    scan.files += 1
    try:
        model = read_model(path)
    except (RuntimeError, ValueError, OSError) as e:
        scan.unreadable.append(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return
    names: dict[str, int] = {}
    for chain in model:
        name = chain.name or "_"
        names[name] = names.get(name, 0) + 1
        suffix = "" if names[name] == 1 else f"#{names[name]}"  # a name repeated in one file stays unique
        try:
            sequence, ca = chain_residues(chain)
        except NonStandardChain:
            scan.nonstandard += 1
            continue
        if not sequence:
            continue  # no protein residues: a nucleic acid, ligand or water chain
        if not lengths[0] <= len(sequence) <= lengths[1]:
            scan.out_of_range += 1
        elif sequence in seen:
            scan.duplicates += 1
        else:
            seen.add(sequence)
            source = label.split("/", 1)[0]
            scan.chains.append(Chain(f"{label}:{name}{suffix}", source, sequence, ca))


def scan_structures(
    sources: Mapping[str, Path] | None = None, min_length: int = 30, max_length: int = 400
) -> StructureScan:
    """Read every structure file of `sources` (default: MDAnalysisTests' data) into deduplicated chains."""
    if min_length < 1 or max_length < min_length:
        raise ValueError(f"chain lengths: expected 1 <= min_length <= max_length, got {min_length}, {max_length}")
    sources = default_sources() if sources is None else dict(sources)
    scan = StructureScan()
    seen: set[str] = set()
    for name in sorted(sources):
        folder = Path(sources[name])
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: structure folder {name!r} not found")
        for path in structure_files(folder):
            label = f"{name}/{path.relative_to(folder).as_posix()}"
            scan_file(path, label, scan, (min_length, max_length), seen)
    return scan


def load_chains(sources: Mapping[str, Path] | None = None, min_length: int = 30, max_length: int = 400) -> list[Chain]:
    """The unique standard-residue protein chains of `sources` with min_length..max_length residues."""
    return scan_structures(sources, min_length, max_length).chains


def describe(scan: StructureScan) -> str:
    """A one-line summary of a scan, for logs and the benchmark."""
    return (
        f"{len(scan.chains)} chains from {scan.files} files ({len(scan.unreadable)} unreadable, "
        f"{scan.nonstandard} non-standard, {scan.out_of_range} out of length range, {scan.duplicates} duplicates)"
    )
