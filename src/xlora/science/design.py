"""Design prompts a scientist can ask without knowing the trained wording: a molecule with a given
formula, an antimicrobial peptide of a given length and net charge; and a one-line check of an answer.

The prompts are the exact formats the design and peptide experts were trained on (`tasks.design_item`,
`tasks.peptide_items`), so every decoding of `decoding.DecodeOptions` applies to them unchanged.
"""

from __future__ import annotations

from .constrained import SmilesGrammar
from .tasks import AMINO, Item, canonical, formula_of, net_charge

MAX_PEPTIDE_LENGTH = 60  # the AMP training peptides are at most ~50 residues; longer is out of distribution


def molecule_request(formula: str) -> Item:
    """The design task's prompt for `formula` (Hill order, heavy atoms C, N, O, F, as in QM9)."""
    if SmilesGrammar.for_formula(formula) is None:
        raise ValueError(
            f"--formula: expected a molecular formula of C, H, N, O, F such as C6H6O (QM9's elements), got {formula!r}"
        )
    return Item(
        "molecule-design", f"Design a molecule with formula {formula}. Answer with a SMILES.", "", {"formula": formula}
    )


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
    seq = "".join(ch for ch in word if ch.isalpha())
    if not seq or not set(seq) <= AMINO:
        return False, "not a peptide of the 20 standard amino acids"
    charge = net_charge(seq)
    ok = len(seq) == item.meta["length"] and abs(charge - item.meta["charge"]) <= 1.0
    return ok, (
        f"length {len(seq)} (asked {item.meta['length']}), net charge {charge:+.1f} at pH 7 "
        f"(asked {item.meta['charge']:+d}, within 1: {'yes' if abs(charge - item.meta['charge']) <= 1.0 else 'no'})"
    )


__all__ = ["MAX_PEPTIDE_LENGTH", "check_design", "molecule_request", "peptide_request"]
