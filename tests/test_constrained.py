"""Constrained decoding: the grammars on hand-made SMILES and peptides, and generation on a tiny model
whose every design answer must have the prompt's form (checked with RDKit's own SMILES parser)."""

from __future__ import annotations

import pytest

from xlora.science.constrained import PeptideGrammar, SmilesGrammar, advance, grammar_for
from xlora.science.datasets import Molecule, Peptide
from xlora.science.decoding import DecodeOptions, decode_answers
from xlora.science.tasks import AMINO, design_item, formula_of, peptide_items, property_item


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
    assert advance(g, g.start, "CCCC") is None  # a fourth carbon: over the budget
    assert advance(g, g.start, "CCN") is None  # an element the formula lacks
    assert not complete(g, "CCC")  # the oxygen is missing: cannot end yet
    assert not complete(g, "C1CC")  # ring bond 1 left open
    assert advance(g, g.start, "C(") is not None and not complete(g, "CC(CO")  # branch left open
    assert advance(g, g.start, "C()") is None  # an empty branch
    assert advance(g, g.start, "C11") is None  # a ring closed on the atom that opened it
    assert advance(g, g.start, "(C") is None and advance(g, g.start, "1C") is None  # nothing to attach to
    assert advance(g, g.start, "CH") is None  # hydrogens only inside brackets
    assert advance(g, g.start, "[X]") is None and advance(g, g.start, "[N]") is None  # unknown / absent element
    assert advance(g, g.start, "CCCO=") is None and advance(g, g.start, "CCCO(") is None  # no atom left after
    assert complete(g, "CCC=O")
    assert complete(g, "CC[CH2]O") and complete(g, "[O-]CCC")


def test_smiles_grammar_only_for_formulas_it_can_write():
    assert SmilesGrammar.for_formula("C2H6S") is None and SmilesGrammar.for_formula("CH3Cl") is None
    assert SmilesGrammar.for_formula("H2") is None and SmilesGrammar.for_formula("not a formula") is None
    assert SmilesGrammar.for_formula("CH4") is not None
    assert grammar_for(property_item(Molecule("1", "CCO", "C2H6O", 7.0, 1.0))) is None  # not a design prompt


def test_peptide_grammar_is_exact_length_over_the_amino_alphabet():
    g = PeptideGrammar(5)
    assert complete(g, "KKLLK") and not complete(g, "KKLL")
    assert advance(g, g.start, "KKLLKK") is None and advance(g, g.start, "KKXLK") is None
    assert advance(g, g.start, "kk") is None  # lower case is not a residue
    design = peptide_items(Peptide("GLFDIVKKVVG", True), design=True)
    assert grammar_for(design).length == 11
    assert grammar_for(peptide_items(Peptide("GLFDIVKKVVG", True), design=False)) is None


def fragment_tokenizer(path):
    """A tokenizer whose tokens are SMILES fragments, residues and junk words, decoded without spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["C", "CC", "c", "c1", "N", "n", "O", "=O", "(", ")", "1", "2", "=", "#", "[", "nH", "]", "F", "H",
              "CO", "OC", "C(", "O)", "[nH]", "Cl", "Br", "S", "A", "K", "KK", "L", "LL", "G", "E", "R", "KLK",
              "hello", "the", "gap", "eV", ";", " ", "x"]  # fmt: skip
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "user": 3, "assistant": 4, "system": 5}
    vocab |= {p: 6 + i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.mark.parametrize("mode", ["constrained", "constrained-checked"])
def test_constrained_answers_have_the_prompts_form(tiny_checkpoint, tmp_path, mode):
    """On a random tiny model, every design answer is syntactically valid SMILES (RDKit's parser,
    unsanitised) with exactly the formula's heavy atoms, or exactly L residues; other prompts decode
    as greedy does."""
    from collections import Counter

    from helpers import load_base
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
    other = [property_item(molecules[0])]
    plain = decode_answers(model, tok, "molecule-properties", other, 6, DecodeOptions(), batch_size=1)
    if mode == "constrained":
        assert decode_answers(model, tok, "molecule-properties", other, 6, opts, batch_size=1) == plain
