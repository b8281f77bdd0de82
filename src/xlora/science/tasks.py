"""The three tasks: prompt/answer builders, answer parsers and metrics.

molecule-properties  SMILES -> HOMO-LUMO gap (eV, 2 decimals) and dipole (debye)
molecule-design      formula -> a SMILES with exactly that formula
peptides             sequence -> antimicrobial yes/no and net charge at pH 7; and the inverse,
                     "design an antimicrobial peptide of length L with net charge +q" -> sequence
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from .datasets import Molecule, Peptide

TASKS = ("molecule-properties", "molecule-design", "peptides")
AMINO = set("ACDEFGHIKLMNPQRSTVWY")


@dataclass
class Item:
    """One prompt/answer pair, with what scoring needs."""

    task: str
    prompt: str
    answer: str
    meta: dict

    def record(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "completion": self.answer, "meta": self.meta}


def net_charge(sequence: str, ph: float = 7.0) -> float:
    """Net charge at `ph` from Biopython's IsoelectricPoint (standard pKa set)."""
    from Bio.SeqUtils.IsoelectricPoint import IsoelectricPoint

    return float(IsoelectricPoint(sequence).charge_at_pH(ph))


def canonical(smiles: str) -> str | None:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    return Chem.MolToSmiles(mol) if mol is not None else None


def formula_of(smiles: str) -> str | None:
    from rdkit import Chem, RDLogger
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    return CalcMolFormula(mol) if mol is not None else None


def property_item(m: Molecule) -> Item:
    return Item(
        "molecule-properties",
        f"Molecule {m.smiles}. Give its HOMO-LUMO gap in eV and its dipole in debye.",
        f"gap {m.gap_ev:.2f} eV; dipole {m.dipole:.2f} D",
        {"gap": m.gap_ev, "dipole": m.dipole, "id": m.id},
    )


def design_item(m: Molecule) -> Item:
    smiles = canonical(m.smiles) or m.smiles
    return Item(
        "molecule-design",
        f"Design a molecule with formula {m.formula}. Answer with a SMILES.",
        smiles,
        {"formula": m.formula, "id": m.id},
    )


def peptide_items(p: Peptide, design: bool) -> Item:
    charge = net_charge(p.sequence)
    if design:
        q = round(charge)
        return Item(
            "peptides",
            f"Design an antimicrobial peptide of length {len(p.sequence)} with net charge {q:+d}.",
            p.sequence,
            {"length": len(p.sequence), "charge": q, "kind": "design"},
        )
    return Item(
        "peptides",
        f"Peptide {p.sequence}. Is it antimicrobial, and what is its net charge at pH 7?",
        f"antimicrobial: {'yes' if p.antimicrobial else 'no'}; charge {charge:+.1f}",
        {"antimicrobial": p.antimicrobial, "charge": charge, "kind": "classify"},
    )


_NUM = r"([-+]?\d+(?:\.\d+)?)"


def _mae(errors: list[float | None]) -> float:
    """Mean absolute error over the parsed answers (None = unparsed); NaN ("n/a") unless at least
    half parse, so a model that answers in the right format once is not ranked on that one answer."""
    parsed = [e for e in errors if e is not None]
    return statistics.fmean(parsed) if parsed and len(parsed) * 2 >= len(errors) else float("nan")


def score(task: str, items: list[Item], answers: list[str], train_smiles: set[str] | None = None) -> dict:
    """Task metrics of generated `answers` against `items` (same order)."""
    if task == "molecule-properties":
        gaps, dips = [], []
        for it, a in zip(items, answers):
            g = re.search(r"gap\s*" + _NUM, a)
            d = re.search(r"dipole\s*" + _NUM, a)
            gaps.append(abs(float(g.group(1)) - it.meta["gap"]) if g else None)
            dips.append(abs(float(d.group(1)) - it.meta["dipole"]) if d else None)
        return {
            "gap_mae_ev": _mae(gaps),
            "dipole_mae_d": _mae(dips),
            "parsed_rate": sum(x is not None for x in gaps) / len(items),
        }
    if task == "molecule-design":
        valid = exact = novel = 0
        for it, a in zip(items, answers):
            smi = a.strip().split()[0] if a.strip() else ""
            can = canonical(smi) if smi else None
            if can is None:
                continue
            valid += 1
            exact += formula_of(can) == it.meta["formula"]
            novel += train_smiles is None or can not in train_smiles
        n = len(items)
        return {"valid_rate": valid / n, "exact_formula_rate": exact / n, "novel_rate": novel / n}
    if task == "peptides":
        acc, charge_err, sat, n_cls, n_des = 0, [], 0, 0, 0
        for it, a in zip(items, answers):
            if it.meta["kind"] == "classify":
                n_cls += 1
                yes = re.search(r"antimicrobial:\s*(yes|no)", a)
                acc += bool(yes) and (yes.group(1) == "yes") == it.meta["antimicrobial"]
                c = re.search(r"charge\s*" + _NUM, a)
                charge_err.append(abs(float(c.group(1)) - it.meta["charge"]) if c else None)
            else:
                n_des += 1
                seq = "".join(ch for ch in a.strip().split()[0] if ch.isalpha()) if a.strip() else ""
                if seq and set(seq) <= AMINO:
                    ok_len = len(seq) == it.meta["length"]
                    sat += ok_len and abs(net_charge(seq) - it.meta["charge"]) <= 1.0
        return {
            "amp_accuracy": acc / max(n_cls, 1),
            "charge_mae": _mae(charge_err),
            "charge_parsed_rate": sum(x is not None for x in charge_err) / max(n_cls, 1),
            "design_satisfied_rate": sat / max(n_des, 1),
        }
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def mean_baseline(task: str, items: list[Item], train_answers: list[str]) -> dict[str, float]:
    """MAE of always answering the training mean, for the task's numeric answers (gap, dipole,
    peptide charge): the bar a model has to clear to have learnt anything about the inputs."""
    fields = {
        "molecule-properties": [("gap_mae_ev", "gap"), ("dipole_mae_d", "dipole")],
        "peptides": [("charge_mae", "charge")],
    }
    out = {}
    for metric, word in fields.get(task, []):
        values = [float(m.group(1)) for a in train_answers if (m := re.search(word + r"\s*" + _NUM, a))]
        targets = [it.meta[word] for it in items if it.meta.get("kind", "classify") == "classify"]
        if values and targets:
            mean = statistics.fmean(values)
            out[metric] = statistics.fmean(abs(mean - t) for t in targets)
    return out
