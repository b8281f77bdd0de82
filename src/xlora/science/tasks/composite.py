"""The composite task: one answer that needs two experts, "formula and HOMO-LUMO gap of a molecule".

The design expert was trained between formulas and SMILES, the property expert from SMILES to the
gap; no expert sees this format. It tests the paper's claim that token-level, layer-wise mixing
makes combinations no single adapter has: a right answer needs the formula tokens from one kind
of knowledge and the gap digits from the other.
"""

from __future__ import annotations

import random
import re

from xlora.science.tasks.datasets import Molecule
from xlora.science.tasks.item import Item

COMPOSITE = "composite"
GAP_TOLERANCE_EV = 0.5  # "gap right" for the both-right rate: within the always-the-mean error scale
_FORMULA = re.compile(r"(?i:formula)\s*(?:is)?\s*:?\s*([A-Z][A-Za-z0-9]*)")  # the formula itself is case-sensitive
_GAP = re.compile(r"(?i:gap)\s*(?:is)?\s*:?\s*([-+]?\d+(?:\.\d+)?)")


def composite_item(m: Molecule) -> Item:
    """Prompt for formula and gap; the reference answer in the format both parsers read."""
    return Item(
        COMPOSITE,
        f"Molecule {m.smiles}. Give its formula and its HOMO-LUMO gap in eV.",
        f"formula {m.formula}; gap {m.gap_ev:.2f} eV",
        {"formula": m.formula, "gap": m.gap_ev, "id": m.id},
    )


def composite_items(molecules: list[Molecule], used_ids: set[str], n: int, seed: int) -> list[Item]:
    """`n` composite items from molecules whose ids are not in `used_ids` (seeded draw)."""
    pool = [m for m in molecules if m.id not in used_ids]
    if len(pool) < n:
        raise ValueError(f"composite: asked for {n} items but only {len(pool)} unused molecules are left")
    return [composite_item(m) for m in random.Random(seed).sample(pool, n)]


def parse_composite(answer: str) -> tuple[str | None, float | None]:
    """(formula, gap in eV) read from an answer, each None when absent."""
    f = _FORMULA.search(answer)
    g = _GAP.search(answer)
    return (f.group(1) if f else None), (float(g.group(1)) if g else None)


def composite_outcomes(items: list[Item], answers: list[str]) -> dict[str, list[float | None]]:
    """Per item: formula exact (0/1), gap absolute error (None when unparsed), both right (0/1:
    exact formula and gap within GAP_TOLERANCE_EV), and whether the gap parsed (0/1)."""
    if len(items) != len(answers):
        raise ValueError(f"composite: {len(items)} items but {len(answers)} answers")
    exact: list[float | None] = []
    gap_err: list[float | None] = []
    both: list[float | None] = []
    for n, (it, a) in enumerate(zip(items, answers), start=1):
        missing = [k for k in ("formula", "gap") if k not in it.meta]
        if missing:
            raise ValueError(f"composite item {n}: its meta lacks {', '.join(missing)}")
        formula, gap = parse_composite(a)
        ok_formula = formula == it.meta["formula"]
        err = abs(gap - it.meta["gap"]) if gap is not None else None
        exact.append(float(ok_formula))
        gap_err.append(err)
        both.append(float(ok_formula and err is not None and err <= GAP_TOLERANCE_EV))
    return {
        "formula_exact_rate": exact,
        "gap_mae_ev": gap_err,
        "both_right_rate": both,
        "gap_parsed_rate": [float(e is not None) for e in gap_err],
    }
