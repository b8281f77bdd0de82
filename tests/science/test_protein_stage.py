"""`xlora make-protein-data`: homology-split files whose test records score and whose train records train."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from xlora.cli import app
from xlora.science.eval.evaluate import read_items
from xlora.science.tasks.proteins import MECHANICS, STRUCTURE, forward_outcomes

runner = CliRunner()


def test_protein_data_files_are_disjoint_and_usable(tmp_path):
    out = tmp_path / "p"
    r = runner.invoke(
        app, ["make-protein-data", "--out", str(out), "--n-structure-train", "60", "--n-structure-test", "20"]
    )
    assert r.exit_code == 0, r.output
    record = json.loads((out / "protein-data.json").read_text())
    assert record["counts"][f"{STRUCTURE}-test.jsonl"] == 40  # 20 domains, a forward and a design item each
    for task in (MECHANICS, STRUCTURE):
        test = read_items(out / f"{task}-test.jsonl")
        forward = [it for it in test if it.meta["kind"] == "forward"]
        errors = forward_outcomes(task, forward, [it.answer for it in forward])  # the reference scores perfectly
        assert all(v in (0.0, 1.0) for values in errors.values() for v in values)
        train = [json.loads(line) for line in (out / f"{task}-train.jsonl").read_text().splitlines()]
        train_prompts = {row["messages"][0]["content"] for row in train}
        # no test sequence was trained on (design prompts are targets, which may repeat: the oracle scores them)
        assert not train_prompts & {it.prompt for it in forward}
    again = runner.invoke(app, ["make-protein-data", "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_protein_data_refuses_a_checkpoint_folder_and_counts_it_does_not_have(tiny_checkpoint, tmp_path):
    r = runner.invoke(app, ["make-protein-data", "--out", str(tiny_checkpoint[1])])
    assert r.exit_code == 2 and "is an X-LoRA checkpoint or an adapter folder" in r.output
    assert not (tiny_checkpoint[1] / "protein-data.json").exists()
    r = runner.invoke(app, ["make-protein-data", "--out", str(tmp_path / "p"), "--n-structure-train", "100000000"])
    assert r.exit_code == 2 and "n_structure_train: 100000000 domains asked for, the homology split holds" in r.output
