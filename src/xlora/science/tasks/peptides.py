"""Peptide tasks: antimicrobial yes/no and net charge, design by length and charge, anticancer yes/no."""

from __future__ import annotations

from xlora.science.tasks.datasets import AnticancerPeptide, Peptide
from xlora.science.tasks.item import Item


def net_charge(sequence: str, ph: float = 7.0) -> float:
    """Net charge at `ph` from Biopython's IsoelectricPoint (standard pKa set)."""
    from Bio.SeqUtils.IsoelectricPoint import IsoelectricPoint

    return float(IsoelectricPoint(sequence).charge_at_pH(ph))


def anticancer_item(p: AnticancerPeptide) -> Item:
    return Item(
        "anticancer",
        f"Peptide {p.sequence}. Is it anticancer?",
        f"anticancer: {'yes' if p.anticancer else 'no'}",
        {"anticancer": p.anticancer},
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
