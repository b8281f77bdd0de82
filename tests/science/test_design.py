"""`xlora design`: the trained design prompts built from a formula or a length and charge, the
answer decoded under the asked form and checked with RDKit / Biopython."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from xlora.cli import app
from xlora.science.eval.design import check_design, molecule_request, peptide_request
from xlora.science.tasks import net_charge

runner = CliRunner()


def test_requests_use_the_trained_wording_and_refuse_what_cannot_be_asked():
    item = molecule_request("C6H6O")
    assert item.prompt == "Design a molecule with formula C6H6O. Answer with a SMILES."
    pep = peptide_request(12, 3)
    assert pep.prompt == "Design an antimicrobial peptide of length 12 with net charge +3."
    for bad in ("C6H5Cl", "benzene", "", "H2", "C\u0666H\u0666O", "C\uff16H\uff16O", "C6H6O "):
        with pytest.raises(ValueError, match="--formula: expected a molecular formula of C, H, N, O, F"):
            molecule_request(bad)
    # the answer is checked against RDKit's formula, so the request must be written as RDKit writes it
    for bad, hill in (("CH3CH2OH", "C2H6O"), ("H6C6O", "C6H6O"), ("C6H6O1", "C6H6O"), ("C06H06O", "C6H6O")):
        with pytest.raises(ValueError, match=f"--formula: write '{bad}' in Hill order, .*: {hill}$"):
            molecule_request(bad)
    with pytest.raises(ValueError, match="no zero counts: C6O"):
        molecule_request("C6H0O")
    assert molecule_request("C2H3FN2O").meta["formula"] == "C2H3FN2O"  # F before N: alphabetical after C, H
    with pytest.raises(ValueError, match="--length: expected 1 to 60 residues, got 0"):
        peptide_request(0, 0)
    with pytest.raises(ValueError, match="--length: expected 1 to 60 residues, got 200"):
        peptide_request(200, 0)
    with pytest.raises(ValueError, match="--charge: a peptide of 3 residues cannot carry a net charge of \\+5"):
        peptide_request(3, 5)


def test_check_design_reads_the_answer_as_rdkit_and_biopython_do():
    item = molecule_request("C6H6O")
    assert check_design(item, "Oc1ccccc1") == (True, "RDKit: valid, C6H6O (the asked formula)")
    assert check_design(item, "c1ccccc1 is benzene") == (False, "RDKit: valid, C6H6 (asked C6H6O)")
    assert check_design(item, "C1CC") == (False, "RDKit: not a valid SMILES")
    assert check_design(item, "") == (False, "RDKit: not a valid SMILES")
    seq = "GLKKLLKKLAKK"
    q = net_charge(seq)
    ok, text = check_design(peptide_request(12, round(q)), seq)
    assert ok and text.startswith(f"length 12 (asked 12), net charge {q:+.1f} at pH 7")
    assert check_design(peptide_request(12, round(q) - 3), seq)[0] is False  # charge off by 3
    assert check_design(peptide_request(11, round(q)), seq)[0] is False  # one residue too many
    assert check_design(peptide_request(5, 0), "hello")[0] is False
    for junk in ("KK-LL", "K1KLL", "KKLL."):  # not four residues, whatever the letters say
        assert check_design(peptide_request(4, 2), junk) == (False, "not a peptide of the 20 standard amino acids")


def design_lines(stdout: str) -> list[str]:
    """The prompt, answer and verdict lines of `xlora design` (other lines, say a first-use model
    conversion note, are left out)."""
    keep = ("Design ", "  answer: ", "  meets the request: ", "  does not meet the request: ")
    return [line for line in stdout.splitlines() if line.startswith(keep)]


@pytest.fixture
def design_base(tiny_checkpoint, tmp_path):
    """The tiny base with a tokenizer of SMILES fragments and residues, and the tiny checkpoint."""
    from helpers import fragment_tokenizer

    base_dir, ck = tiny_checkpoint
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    fragment_tokenizer(base)
    return base, ck


def test_design_cli_answers_in_the_asked_form(design_base):
    """On a random tiny model the constrained decodings still answer with the asked heavy atoms
    (RDKit may refuse the valences: the model's part) and exactly the asked length."""
    from collections import Counter

    from rdkit import Chem

    base, ck = design_base
    args = ["design", "--base", str(base), "--checkpoint", str(ck)]
    r = runner.invoke(app, args + ["--formula", "C3H6O", "--samples", "2"])
    assert r.exit_code == 0, r.output
    prompt, answer, verdict = design_lines(r.stdout)
    assert prompt == "Design a molecule with formula C3H6O. Answer with a SMILES."
    smiles = answer.removeprefix("  answer: ")
    parsed = Chem.MolFromSmiles(smiles, sanitize=False)
    assert parsed is not None and Counter(a.GetSymbol() for a in parsed.GetAtoms()) == Counter("CCCO")
    assert verdict.strip().startswith(("meets the request: RDKit", "does not meet the request: RDKit"))
    r = runner.invoke(app, args + ["--length", "7", "--charge", "2", "--decoding", "constrained"])
    assert r.exit_code == 0, r.output
    seq = design_lines(r.stdout)[1].removeprefix("  answer: ")
    assert len(seq) == 7 and "length 7 (asked 7)" in r.output


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give either --formula (a molecule) or --length [--charge] (a peptide)"),
        (["--formula", "C2H6O", "--length", "5"], "give either --formula"),
        (["--formula", "C2H6O", "--charge", "2"], "--charge applies to a peptide: add --length"),
        (["--formula", "C2H5Cl"], "--formula: expected a molecular formula"),
        (["--length", "5", "--decoding", "beam"], "decoding: expected one of greedy"),
        (["--length", "5", "--charge", "9"], "cannot carry a net charge of +9"),
        (["--length", "5", "--decoding", "beam"], "--decoding: expected one of greedy"),
        (["--length", "5", "--samples", "0"], "--samples: expected an integer from 1 to 64, got 0"),
        (["--length", "5", "--samples", "100000"], "--samples: expected an integer from 1 to 64"),
        (["--length", "5", "--seed", "-1"], "--seed: expected an integer from 0"),
        (["--length", "5", "--decoding", "greedy", "--samples", "4"], "--samples and --seed apply to the checked"),
        (["--formula", "CH3CH2OH"], "--formula: write 'CH3CH2OH' in Hill order"),
    ],
)
def test_design_cli_refuses_bad_requests_in_one_line(design_base, extra, message):
    base, ck = design_base
    r = runner.invoke(app, ["design", "--base", str(base), "--checkpoint", str(ck), *extra])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert message in " ".join(r.output.split()), r.output


@pytest.mark.embedded
def test_design_cli_on_the_shipped_checkpoint():
    """The README's command on the real model: a peptide of exactly the asked length, checked."""
    r = runner.invoke(app, ["design", "--length", "12", "--charge", "3", "--decoding", "constrained"])
    assert r.exit_code == 0, r.output
    prompt, answer, verdict = design_lines(r.stdout)
    assert prompt == "Design an antimicrobial peptide of length 12 with net charge +3."
    seq = answer.removeprefix("  answer: ")
    assert len(seq) == 12 and set(seq) <= set("ACDEFGHIKLMNPQRSTVWY")
    assert f"net charge {net_charge(seq):+.1f} at pH 7 (asked +3" in verdict
