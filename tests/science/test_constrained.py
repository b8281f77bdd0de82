"""Constrained decoding: the grammars on hand-made SMILES and peptides, and generation on a tiny model
whose every design answer must have the prompt's form (checked with RDKit's own SMILES parser)."""

from __future__ import annotations

import pytest

from xlora.science.eval.constrained import PeptideGrammar, SmilesGrammar, advance, grammar_for
from xlora.science.eval.decoding import DecodeOptions, decode_answers
from xlora.science.tasks import AMINO, design_item, formula_of, peptide_items, property_item
from xlora.science.tasks.datasets import Molecule, Peptide


def reachable(grammar, text: str) -> bool:
    """Whether a constrained decoder can write `text` (it stays in the grammar and can still end)."""
    state = advance(grammar, grammar.start, text)
    return state is not None and grammar.viable(state)


def complete(grammar, text: str) -> bool:
    state = advance(grammar, grammar.start, text)
    return state is not None and grammar.can_end(state)


@pytest.mark.parametrize(
    "smiles",
    ["CC1(C(=O)NC=N)CO1", "CC(=O)C(C#N)C(N)=O", "CCc1cnoc1CO", "c1cc[nH]c1", "OC1=CC=CC=C1", "C[NH2+]CC([O-])=O",
     "FC(F)(F)C#N", "C1CC2CC1C2", "N#CC1=CC=CO1"],
)  # fmt: skip
def test_smiles_grammar_accepts_real_molecules_of_their_formula(smiles):
    grammar = SmilesGrammar.for_formula(formula_of(smiles))
    assert complete(grammar, smiles)


def test_smiles_grammar_rejects_what_cannot_be_the_answer():
    g = SmilesGrammar.for_formula("C3H8O")  # propanol's heavy atoms: C3 O1
    assert complete(g, "CCCO") and complete(g, "CC(C)O") and complete(g, "C1CO1C")
    assert reachable(g, "CCCC") is False  # a fourth carbon: over the budget
    assert reachable(g, "CCN") is False  # an element the formula lacks
    assert not complete(g, "CCC")  # the oxygen is missing: cannot end yet
    assert not complete(g, "C1CC")  # ring bond 1 left open
    assert reachable(g, "C(") and not complete(g, "CC(CO")  # branch left open
    assert reachable(g, "C()") is False  # an empty branch
    assert reachable(g, "C11") is False  # a ring closed on the atom that opened it
    assert reachable(g, "(C") is False and reachable(g, "1C") is False  # nothing to attach to
    assert reachable(g, "CH") is False  # hydrogens only inside brackets
    assert reachable(g, "[X]") is False and reachable(g, "[N]") is False  # unknown / absent element
    assert reachable(g, "CCCO=") is False and reachable(g, "CCCO(") is False  # no atom left after
    assert complete(g, "CCC=O")
    assert complete(g, "CC[CH2]O") and complete(g, "[O-]CCC")


def test_smiles_grammar_has_no_dead_ends_and_no_bonds_rdkit_refuses():
    """Every complete string over a small alphabet up to 7 characters parses in RDKit (unsanitised),
    and every viable partial string has a viable next character (the decoder never gets stuck)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    for formula in ("C3H6", "C2H5NO"):
        g = SmilesGrammar.for_formula(formula)
        frontier, complete_strings = [("", g.start)], 0
        for _ in range(7):
            grown = []
            for text, state in frontier:
                nxt = [(text + ch, s) for ch in "CNO()=#12[]H+" if (s := g.step(state, ch)) and g.viable(s)]
                assert nxt or g.can_end(state), (formula, text)
                for t, s in nxt:
                    if g.can_end(s):
                        complete_strings += 1
                        assert Chem.MolFromSmiles(t, sanitize=False) is not None, t
                grown += nxt
            frontier = grown
        assert complete_strings > 100
    g = SmilesGrammar.for_formula("C3H6")
    assert not g.viable(advance(g, g.start, "C1(CC)"))  # the ring can no longer close: never written
    assert complete(g, "C1(CC1)") and complete(g, "C1CC=1") and complete(g, "C=1CC1")
    for text in ("C1C1C", "C1C(=1C)", "C1(C)=1C", "C12CC12"):  # bonds RDKit refuses
        assert advance(g, g.start, text) is None or not complete(g, text), text


def test_smiles_grammar_only_for_formulas_it_can_write():
    assert SmilesGrammar.for_formula("C2H6S") is None and SmilesGrammar.for_formula("CH3Cl") is None
    assert SmilesGrammar.for_formula("H2") is None and SmilesGrammar.for_formula("not a formula") is None
    assert SmilesGrammar.for_formula("CH4") is not None and SmilesGrammar.for_formula("C0H4") is None
    assert SmilesGrammar.for_formula("CH3CH2OH").budget == (2, 1)  # elements mentioned twice are summed
    assert grammar_for(property_item(Molecule("1", "CCO", "C2H6O", 7.0, 1.0))) is None  # not a design prompt


def test_peptide_grammar_is_exact_length_over_the_amino_alphabet():
    g = PeptideGrammar(5)
    assert complete(g, "KKLLK") and not complete(g, "KKLL")
    assert advance(g, g.start, "KKLLKK") is None and advance(g, g.start, "KKXLK") is None
    assert advance(g, g.start, "kk") is None  # lower case is not a residue
    design = peptide_items(Peptide("GLFDIVKKVVG", True), design=True)
    assert grammar_for(design).length == 11
    assert grammar_for(peptide_items(Peptide("GLFDIVKKVVG", True), design=False)) is None


def test_token_texts_keep_a_sentencepiece_tokens_leading_space():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from xlora.science.eval.constrained import TokenTable

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "\u2581a": 1, "a": 2, "\u2581C": 3, "C": 4}, unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    table = TokenTable(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>"))
    assert table.texts[3] == " C" and table.texts[4] == "C"
    assert table.candidates(frozenset("C")) == [4]  # "▁C" would put a space inside a SMILES


@pytest.mark.parametrize("mode", ["constrained", "constrained-checked"])
def test_constrained_answers_have_the_prompts_form(tiny_checkpoint, tmp_path, mode):
    """On a random tiny model, every design answer is syntactically valid SMILES (RDKit's parser,
    unsanitised) with exactly the formula's heavy atoms, or exactly L residues; other prompts decode
    as greedy does."""
    from collections import Counter

    from helpers import fragment_tokenizer, load_base
    from rdkit import Chem

    from xlora import XLoraModel

    base_dir, ck = tiny_checkpoint
    tok = fragment_tokenizer(tmp_path / "tok")
    model = XLoraModel.from_pretrained(load_base(base_dir), ck).eval()
    molecules = [Molecule(str(i), s, formula_of(s), 7.0, 1.0) for i, s in enumerate(["CCO", "C1CC1N", "OC=CC#N"])]
    items = [design_item(m) for m in molecules]
    opts = DecodeOptions(mode, samples=2, seed=3)
    answers = decode_answers(model, tok, "molecule-design", items, 24, opts, batch_size=2)
    for m, answer in zip(molecules, answers):
        parsed = Chem.MolFromSmiles(answer, sanitize=False)
        assert parsed is not None, answer
        heavy = Counter(a.GetSymbol() for a in parsed.GetAtoms())
        want = Counter(a.GetSymbol() for a in Chem.MolFromSmiles(m.smiles).GetAtoms())
        assert heavy == want, (answer, m.formula)
    peptides = [peptide_items(Peptide(s, True), design=True) for s in ("KKLLKGL", "GLKKLLKKLAK")]
    answers = decode_answers(model, tok, "peptides", peptides, 16, opts, batch_size=2)
    assert [len(a) for a in answers] == [7, 11] and all(set(a) <= AMINO for a in answers)
    tok.eos_token = None  # no end-of-turn token: the grammar still steers, nothing crashes
    answers = decode_answers(model, tok, "peptides", peptides[:1], 9, opts, batch_size=1)
    assert len(answers[0]) >= 7 and set(answers[0][:7]) <= AMINO
    tok = fragment_tokenizer(tmp_path / "tok")
    other = [property_item(molecules[0])]
    plain = decode_answers(model, tok, "molecule-properties", other, 6, DecodeOptions(), batch_size=1)
    if mode == "constrained":
        assert decode_answers(model, tok, "molecule-properties", other, 6, opts, batch_size=1) == plain
