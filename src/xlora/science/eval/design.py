"""Design prompts a scientist can ask without knowing the trained wording: a molecule with a given
formula, an antimicrobial peptide of a given length and net charge; and a one-line check of an answer.

The prompts are the exact formats the design and peptide experts were trained on (`tasks.design_item`,
`tasks.peptide_items`), so every decoding of `decoding.DecodeOptions` applies to them unchanged.
"""

from __future__ import annotations

import re

from xlora.science.eval.constrained import SmilesGrammar
from xlora.science.tasks import AMINO, Item, canonical, formula_of, net_charge

MAX_PEPTIDE_LENGTH = 60  # the AMP training peptides are at most ~50 residues; longer is out of distribution


def molecule_request(formula: str) -> Item:
    """The design task's prompt for `formula`: Hill order (C, H, then the others alphabetically, as
    RDKit writes it), heavy atoms C, N, O, F as in QM9, ASCII digits."""
    expected = (
        f"--formula: expected a molecular formula of C, H, N, O, F such as C6H6O (QM9's elements), got {formula!r}"
    )
    parts = re.findall(r"([A-Z][a-z]?)([0-9]*)", formula)
    if (
        not formula.isascii()
        or "".join(e + n for e, n in parts) != formula
        or SmilesGrammar.for_formula(formula) is None
    ):
        raise ValueError(expected)
    counts: dict[str, int] = {}
    for element, n in parts:
        counts[element] = counts.get(element, 0) + int(n or 1)
    order = ["C", "H"] + sorted(e for e in counts if e not in ("C", "H"))
    hill = "".join(f"{e}{counts[e] if counts[e] > 1 else ''}" for e in order if counts.get(e, 0) > 0)
    if hill != formula:  # the check compares RDKit's formula with this text: it must be RDKit's form
        raise ValueError(f"--formula: write {formula!r} in Hill order, each element once, no zero counts: {hill}")
    return Item(
        "molecule-design", f"Design a molecule with formula {formula}. Answer with a SMILES.", "", {"formula": formula}
    )


def heavy_atoms(formula: str) -> int:
    """Atoms other than H in a formula `molecule_request` accepted."""
    return sum(int(n or 1) for e, n in re.findall(r"([A-Z][a-z]?)([0-9]*)", formula) if e != "H")


def peptide_request(length: int, charge: int) -> Item:
    """The peptide task's design prompt: `length` residues, net charge `charge` at pH 7."""
    if not 1 <= length <= MAX_PEPTIDE_LENGTH:
        raise ValueError(f"--length: expected 1 to {MAX_PEPTIDE_LENGTH} residues, got {length}")
    if abs(charge) > length:
        raise ValueError(f"--charge: a peptide of {length} residues cannot carry a net charge of {charge:+d}")
    prompt = f"Design an antimicrobial peptide of length {length} with net charge {charge:+d}."
    return Item("peptides", prompt, "", {"length": length, "charge": charge, "kind": "design"})


def check_design(item: Item, answer: str) -> tuple[bool, str]:
    """Whether `answer` meets `item`'s stated constraints, and what was checked (RDKit / Biopython)."""
    word = answer.strip().split()[0] if answer.strip() else ""
    if item.task == "molecule-design":
        can = canonical(word) if word else None
        if can is None:
            return False, "RDKit: not a valid SMILES"
        formula = formula_of(can)
        ok = formula == item.meta["formula"]
        return ok, f"RDKit: valid, {formula} ({'the asked formula' if ok else 'asked ' + item.meta['formula']})"
    seq = word  # strict: "KK-LL" is not a peptide of four residues
    if not seq or not set(seq) <= AMINO:
        return False, "not a peptide of the 20 standard amino acids"
    charge = net_charge(seq)
    ok = len(seq) == item.meta["length"] and abs(charge - item.meta["charge"]) <= 1.0
    return ok, (
        f"length {len(seq)} (asked {item.meta['length']}), net charge {charge:+.1f} at pH 7 "
        f"(asked {item.meta['charge']:+d}, within 1: {'yes' if abs(charge - item.meta['charge']) <= 1.0 else 'no'})"
    )


__all__ = ["MAX_PEPTIDE_LENGTH", "check_design", "heavy_atoms", "molecule_request", "peptide_request"]
