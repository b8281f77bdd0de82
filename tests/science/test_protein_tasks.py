"""Protein task prompts, answer parsing and scoring (forward errors, validity, oracle-checked designs)."""

from __future__ import annotations

import pytest

from xlora.science.tasks.proteins import (
    MECHANICS,
    STRUCTURE,
    design_outcomes,
    designed_sequence,
    forward_outcomes,
    mean_errors,
    mechanics_item,
    structure_item,
    valid_design,
)

SEQ = (  # an arbitrary sequence of standard residues
    "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQT"
    "LGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPF"
    "LPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWQTPSLELAAWRPLKWNG"
)


def test_forward_items_answer_in_the_format_they_are_scored_in():
    """A model that repeats the reference answer scores zero error: prompts, answers and parsers agree."""
    mech = mechanics_item(SEQ[:120], 0.0421, 1.83, design=False)
    struct = structure_item(SEQ[:80], 0.42, 0.18, "a", design=False)
    assert mech.prompt.startswith("Protein MKTAY") and "stiffness" in mech.prompt
    assert forward_outcomes(MECHANICS, [mech], [mech.answer]) == {"frequency_mae": [0.0], "stiffness_mae": [0.0]}
    got = forward_outcomes(STRUCTURE, [struct], [struct.answer])
    assert got == {"helix_mae": [0.0], "strand_mae": [0.0], "class_accuracy": [1.0]}
    wrong = forward_outcomes(STRUCTURE, [struct], ["helix 50 %; class b"])
    assert wrong == {"helix_mae": [8.0], "strand_mae": [None], "class_accuracy": [0.0]}


def test_design_validity_and_the_oracle_decide_satisfaction():
    items = [structure_item("A" * 100, 0.8, 0.0, "a", design=True) for _ in range(4)]
    assert "100 residues, mostly alpha-helical (about 80 % helix)" in items[0].prompt
    answers = ["A" * 105, "A" * 111, "AXA" * 33, "L" * 95 + " because helices"]
    oracle_calls = []

    def oracle(seqs):
        oracle_calls.append(list(seqs))
        return [90.0 if s.startswith("A") else 50.0 for s in seqs]

    got = design_outcomes(STRUCTURE, items, answers, oracle)
    assert got["valid_rate"] == [1.0, 0.0, 0.0, 1.0]  # 111 is 11 % too long; X is no amino acid
    assert got["design_satisfied_rate"] == [1.0, 0.0, 0.0, 0.0]  # 90 within 15 points of 80; 50 is not
    assert oracle_calls == [["A" * 105, "L" * 95]]  # only valid designs reach the oracle
    mech = [mechanics_item("K" * 50, 0.05, 2.0, design=True)]
    assert design_outcomes(MECHANICS, mech, ["K" * 50], lambda s: [2.4])["design_satisfied_rate"] == [1.0]
    assert design_outcomes(MECHANICS, mech, ["K" * 50], lambda s: [2.6])["design_satisfied_rate"] == [0.0]


def test_parsing_edges_and_baselines():
    assert designed_sequence("  mkvl, then more") == "MKVL" and designed_sequence("") == ""
    assert not valid_design("", 10) and valid_design("A" * 9, 10)
    with pytest.raises(ValueError, match="scop_class: expected one of a, b, c, d, got 'z'"):
        structure_item("AAAA", 0.1, 0.1, "z", design=False)
    train = [mechanics_item("A" * 40, f, s, design=False) for f, s in ((0.1, 1.0), (0.3, 3.0))]
    test = [mechanics_item("A" * 40, 0.2, 4.0, design=False)]
    assert mean_errors(test, train, ("frequency", "stiffness")) == pytest.approx(
        {"frequency_mae": 0.0, "stiffness_mae": 2.0}
    )
