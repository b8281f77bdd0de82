"""SCOPe domains with DSSP secondary structure, read offline from the installed `sidechainnet` package.

Source: `sidechainnet/resources/single_domain_dssp_annotations.json` (SCOPe 2.07 domains, 93,212
entries), keyed `"<PDB>_<sid>"` (e.g. `"3OZU_d3ozua1"`), each with `Sequence`, `DSSP` (same length,
8 states H G I E B T S L, `L` for loop) and `SCCS` (e.g. `"a.1.1.0"`: class.fold.superfamily.family,
family 0 for SCOPe's automated matches). `astral_data.txt` is the SCOPe 2.01-2.07 `dir.des` files
concatenated (`px` lines map sid -> sccs); it agrees with every `SCCS` of the json that it lists
(78,979 of 93,212), so the json alone is read and sidechainnet itself is never imported (its
dependencies are not needed).

Choices:
- Residues: 72 domains hold `X` (unknown residue); they are dropped, not cleaned, so every sequence is
  the 20 standard amino acids and stays aligned residue for residue with its DSSP string.
- Duplicates: identical sequences (other chains, other structures of one protein) keep one domain,
  the smallest sid; copies never disagree on class or superfamily. 93,212 -> 28,038 unique (all classes).
- Classes kept by default: a-d (all-alpha, all-beta, alpha/beta, alpha+beta), the four classes that
  SCOP defines by secondary-structure content: 25,964 unique domains (a 4,887, b 8,102, c 6,657,
  d 6,318), 1,252 superfamilies.
  e (multi-domain), f (membrane and cell surface) and g (small, disulfide/metal rich) are defined by
  other criteria, so a class predicted from secondary structure is ill-posed for them; pass
  `classes="abcdefg"` to keep them.
- Fractions: helix = H (alpha) + G (3-10) + I (pi); strand = E (ladder) + B (isolated bridge);
  coil = T S L (turns, bends, loops): the usual 8 -> 3 state reduction.

Parsing all of it takes about 0.7 s on one core, so no cache file is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from xlora.science.tasks.datasets import package_file

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
DSSP_STATES = "HGIEBTSL"
HELIX_STATES = frozenset("HGI")
STRAND_STATES = frozenset("EB")
DEFAULT_CLASSES = "abcd"
SCOP_CLASSES = {
    "a": "all alpha",
    "b": "all beta",
    "c": "alpha and beta (a/b)",
    "d": "alpha and beta (a+b)",
    "e": "multi-domain (alpha and beta)",
    "f": "membrane and cell surface",
    "g": "small proteins",
}
DSSP_FILE = "single_domain_dssp_annotations.json"
PIP_HINT = "pip install --no-deps sidechainnet==1.0.1"


@dataclass(frozen=True)
class Domain:
    """One SCOPe domain: sequence, per-residue DSSP state and its SCOP classification."""

    id: str  # SCOPe sid, e.g. "d3ozua1"
    sequence: str  # 20 standard amino acids
    dssp: str  # 8-state DSSP, len == len(sequence)
    scop_class: str  # "a".."g"
    superfamily: str  # e.g. "a.1.1"

    @property
    def helix_fraction(self) -> float:
        """Share of residues in H, G or I."""
        return sum(s in HELIX_STATES for s in self.dssp) / len(self.dssp)

    @property
    def strand_fraction(self) -> float:
        """Share of residues in E or B."""
        return sum(s in STRAND_STATES for s in self.dssp) / len(self.dssp)

    @property
    def coil_fraction(self) -> float:
        """Share of residues in neither helix nor strand (T, S, L)."""
        return 1.0 - self.helix_fraction - self.strand_fraction


def resources_file(name: str) -> Path:
    """A file in sidechainnet/resources, with a pip hint when the package is missing."""
    return package_file("sidechainnet", "resources", name, hint=PIP_HINT)


def is_standard(sequence: str) -> bool:
    """True when every residue is one of the 20 standard amino acids."""
    return bool(sequence) and set(sequence) <= set(AMINO_ACIDS)


def parse_entry(key: str, entry: dict) -> Domain | None:
    """One json entry -> Domain, or None when it has non-standard residues or broken fields."""
    seq, dssp, sccs = entry.get("Sequence", ""), entry.get("DSSP", ""), entry.get("SCCS", "")
    parts = sccs.split(".")
    if not is_standard(seq) or len(dssp) != len(seq) or not set(dssp) <= set(DSSP_STATES) or len(parts) < 3:
        return None
    sid = key.partition("_")[2] or key
    return Domain(sid, seq, dssp, parts[0], ".".join(parts[:3]))


def unique_by_sequence(domains: Iterable[Domain]) -> list[Domain]:
    """One domain per distinct sequence (the smallest sid), sorted by sid."""
    best: dict[str, Domain] = {}
    for d in domains:
        if d.sequence not in best or d.id < best[d.sequence].id:
            best[d.sequence] = d
    return sorted(best.values(), key=lambda d: d.id)


def load_domains(limit: int | None = None, classes: str = DEFAULT_CLASSES, path: Path | None = None) -> list[Domain]:
    """Unique standard-residue SCOPe domains of `classes`, sorted by sid (PDB order mixes classes),
    the first `limit` of them."""
    unknown = set(classes) - set(SCOP_CLASSES)
    if unknown:
        raise ValueError(f"unknown SCOP classes {sorted(unknown)}: use letters of {''.join(SCOP_CLASSES)}")
    source = path or resources_file(DSSP_FILE)
    try:
        with source.open(encoding="utf-8") as f:
            raw: dict[str, dict] = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}: not the SCOPe DSSP JSON this reads ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object of domains, got {type(raw).__name__}")
    parsed = (parse_entry(k, v) for k, v in raw.items())
    kept = unique_by_sequence(d for d in parsed if d is not None and d.scop_class in classes)
    return kept if limit is None else kept[:limit]
