"""The composite task's parser and scorer on hand-made answers whose scores are known."""

from __future__ import annotations

import math

import pytest

from xlora.science.tasks import score
from xlora.science.tasks.composite import composite_item, composite_items, composite_outcomes, parse_composite
from xlora.science.tasks.datasets import Molecule

PHENOL = Molecule(id="7", smiles="OC1=CC=CC=C1", formula="C6H6O", gap_ev=6.21, dipole=1.3)
WATER = Molecule(id="1", smiles="O", formula="H2O", gap_ev=9.1, dipole=2.0)


def test_reference_answers_score_perfectly():
    items = [composite_item(PHENOL), composite_item(WATER)]
    out = composite_outcomes(items, [it.answer for it in items])
    assert out["formula_exact_rate"] == [1.0, 1.0]
    assert out["both_right_rate"] == [1.0, 1.0]
    assert max(out["gap_mae_ev"]) <= 0.005  # the answer rounds to 2 decimals


def test_hand_made_answers():
    items = [composite_item(PHENOL)] * 5
    answers = [
        "formula C6H6O; gap 6.50 eV",  # both right (0.29 off)
        "formula C6H6O; gap 7.00 eV",  # formula right, gap 0.79 off: not both
        "formula C6H5O; gap 6.21 eV",  # gap right, formula wrong
        "the formula is unknown",  # nothing parses ("is" is not a formula)
        "gap: 5.21",  # gap only, 1.0 off
    ]
    out = composite_outcomes(items, answers)
    assert out["formula_exact_rate"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert out["both_right_rate"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert out["gap_parsed_rate"] == [1.0, 1.0, 1.0, 0.0, 1.0]
    errs = out["gap_mae_ev"]
    assert errs[3] is None and math.isclose(errs[0], 0.29) and math.isclose(errs[4], 1.0)
    s = score("composite", items, answers)
    assert math.isclose(s["both_right_rate"], 0.2) and math.isclose(s["formula_exact_rate"], 0.4)
    assert math.isclose(s["gap_mae_ev"], (0.29 + 0.79 + 0.0 + 1.0) / 4)


def test_parser_reads_variants():
    assert parse_composite("Formula: C2H6O, Gap is 7.1 eV") == ("C2H6O", 7.1)
    assert parse_composite("formula c2h6o") == (None, None)  # element symbols are case-sensitive
    assert parse_composite("") == (None, None)


def test_items_avoid_used_molecules_and_errors_are_clear():
    items = composite_items([PHENOL, WATER], used_ids={"7"}, n=1, seed=0)
    assert [it.meta["id"] for it in items] == ["1"]
    with pytest.raises(ValueError, match="asked for 2 items but only 1 unused"):
        composite_items([PHENOL, WATER], used_ids={"7"}, n=2, seed=0)
    bad = composite_item(PHENOL)
    bad.meta.pop("gap")
    with pytest.raises(ValueError, match="composite item 1: its meta lacks gap"):
        composite_outcomes([bad], ["formula C6H6O; gap 6.2"])
    with pytest.raises(ValueError, match="1 items but 2 answers"):
        composite_outcomes([composite_item(PHENOL)], ["a", "b"])
