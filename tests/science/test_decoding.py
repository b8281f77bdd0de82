"""Sample-and-check decoding: hand-made answer sets whose combined answer is known, and the CLI path."""

from __future__ import annotations

import pytest

from xlora.science.eval.decoding import DecodeOptions, combine, decode_answers
from xlora.science.tasks import design_item, net_charge, peptide_items, property_item, score
from xlora.science.tasks.datasets import Molecule, Peptide

PHENOL = Molecule(id="7", smiles="OC1=CC=CC=C1", formula="C6H6O", gap_ev=6.21, dipole=1.3)


def test_numbers_take_the_median_of_the_answers_that_give_them():
    item = property_item(PHENOL)
    answers = ["gap 7.00 eV; dipole 1.00 D", "gap 6.00 eV; dipole 3.00 D", "no idea", "gap 6.40 eV; dipole 2.00 D"]
    assert combine("molecule-properties", item, answers) == "gap 6.40 eV; dipole 2.00 D"
    assert combine("molecule-properties", item, ["nothing", "at all"]) == "nothing"  # greedy when none parse


def test_design_keeps_the_first_answer_meeting_the_prompts_formula():
    item = design_item(PHENOL)  # asks for C6H6O
    answers = ["C1=CC=CC=C1", "not a smiles", "Oc1ccccc1", "c1ccc(O)cc1"]  # benzene (wrong formula), ..., phenol
    assert combine("molecule-design", item, answers) == "Oc1ccccc1"
    assert score("molecule-design", [item], [combine("molecule-design", item, answers)])["exact_formula_rate"] == 1.0
    assert combine("molecule-design", item, ["C(", "C1CC", "x"]) == "C("  # none is a molecule: the greedy answer


def test_design_falls_back_to_a_valid_molecule_before_the_greedy_string():
    item = design_item(PHENOL)  # asks for C6H6O; none of these has it
    answers = ["C1CC", "CC(", "CCO", "C1=CC=CC=C1"]  # unclosed ring, open branch, ethanol, benzene
    assert combine("molecule-design", item, answers) == "CCO"  # the first valid molecule, not broken greedy
    scores = score("molecule-design", [item], [combine("molecule-design", item, answers)])
    assert scores["valid_rate"] == 1.0 and scores["exact_formula_rate"] == 0.0
    assert combine("molecule-design", item, ["C1CC", "CCO", "Oc1ccccc1"]) == "Oc1ccccc1"  # the formula still wins


def test_design_check_reads_the_prompt_not_the_reference():
    item = design_item(PHENOL)
    item.meta["formula"] = "C2H6O"  # a wrong reference must not steer the choice
    assert combine("molecule-design", item, ["CCO", "Oc1ccccc1"]) == "Oc1ccccc1"


def test_peptides_vote_and_check_length_and_charge():
    classify = peptide_items(Peptide("KKLLKKLLKK", True), design=False)
    answers = ["antimicrobial: no; charge +1.0", "antimicrobial: yes; charge +5.0", "antimicrobial: yes; charge +6.0"]
    assert combine("peptides", classify, answers) == "antimicrobial: yes; charge +5.0"
    tie = ["antimicrobial: no; charge +2.0", "antimicrobial: yes; charge +4.0"]
    assert combine("peptides", classify, tie).startswith("antimicrobial: no")  # a tie keeps greedy's label
    design = peptide_items(Peptide("KKLLKKLLKK", True), design=True)
    q = design.meta["charge"]
    assert abs(net_charge("KKLLKKLLKK") - q) <= 1
    answers = ["KKLLKK", "EELLEELLEE", "KKLLKKLLKK", "KKLLKKLLKR"]  # too short, wrong charge, right, right
    assert combine("peptides", design, answers) == "KKLLKKLLKK"
    assert combine("peptides", design, ["KKLLKK", "EELLEELLEE", "EELLEELLE"]) == "EELLEELLEE"  # right length only
    assert combine("peptides", design, ["KKLLKK", "EEXBEELLEE"]) == "KKLLKK"  # none has the length: greedy
    with pytest.raises(ValueError, match="combine: no answers"):
        combine("peptides", design, [])


@pytest.mark.parametrize(
    "kw, message",
    [({"mode": "beam"}, "expected one of greedy, checked"), ({"mode": "checked", "samples": 0}, "samples >= 1")],
)
def test_options_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        DecodeOptions(**kw)


def test_checked_decoding_on_a_model_is_reproducible(tiny_checkpoint):
    """On a real (tiny) model: one answer per item, the same answers for the same seed, greedy first."""
    from helpers import load_base
    from transformers import AutoTokenizer

    from xlora import XLoraModel

    base_dir, ck = tiny_checkpoint
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = XLoraModel.from_pretrained(load_base(base_dir), ck).eval()
    items = [property_item(PHENOL), design_item(PHENOL), property_item(PHENOL)]
    opts = DecodeOptions("checked", samples=3, seed=5)
    a = decode_answers(model, tok, "molecule-properties", items, 6, opts, batch_size=2)
    b = decode_answers(model, tok, "molecule-properties", items, 6, opts, batch_size=2)
    greedy = decode_answers(model, tok, "molecule-properties", items, 6, DecodeOptions(), batch_size=2)
    assert a == b and len(a) == 3 and len(greedy) == 3
    # a random tiny model gives no numbers: checked decoding falls back to the greedy answers
    assert a == greedy


def test_checked_decoding_samples_each_item(tiny_checkpoint, monkeypatch):
    """Each item's candidates are its greedy answer then `samples` sampled answers of the same prompt."""
    from helpers import load_base
    from transformers import AutoTokenizer

    from xlora import XLoraModel
    from xlora.science.eval import decoding

    base_dir, ck = tiny_checkpoint
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = XLoraModel.from_pretrained(load_base(base_dir), ck).eval()
    seen = []
    monkeypatch.setattr(decoding, "combine", lambda task, item, answers: seen.append((item, answers)) or answers[0])
    items = [property_item(PHENOL), design_item(PHENOL)]
    greedy = decode_answers(model, tok, "molecule-properties", items, 6, DecodeOptions(), batch_size=2)
    decode_answers(model, tok, "molecule-properties", items, 6, DecodeOptions("checked", samples=4), batch_size=2)
    assert [it for it, _ in seen] == items and all(len(a) == 5 for _, a in seen)
    assert [a[0] for _, a in seen] == greedy
    assert any(s != a[0] for _, a in seen for s in a[1:])  # sampled, not greedy again
