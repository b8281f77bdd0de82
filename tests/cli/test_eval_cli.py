"""`xlora eval` on a tiny checkpoint: intervals and n for every model, paired difference, errors."""

from __future__ import annotations

import json
import re

import pytest
from helpers import add_tiny_tokenizer, load_base
from transformers import AutoTokenizer
from typer.testing import CliRunner

from xlora import XLoraConfig, XLoraModel
from xlora.cli import app
from xlora.science.tasks import peptide_items
from xlora.science.tasks.datasets import Peptide

runner = CliRunner()
MODELS = ["base", "expert chem", "expert prot", "expert cot", "uniform mix (1/N)", "X-LoRA"]


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """A saved tiny X-LoRA checkpoint and a peptides task file: 4 classification items (2 marked
    loss-only), 2 design items, and one record of another task that must be ignored."""
    base_dir, experts = tiny
    add_tiny_tokenizer(base_dir)
    root = tmp_path_factory.mktemp("eval")
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    model.save_pretrained(root / "ck")
    peps = [
        Peptide("KKLLKKLLKK", True),
        Peptide("DDEEGAGA", False),
        Peptide("GLFDIVKKVV", True),
        Peptide("AAAA", False),
    ]
    items = [peptide_items(p, design=False) for p in peps] + [peptide_items(p, design=True) for p in peps[:2]]
    items[2].meta["loss_only"] = items[3].meta["loss_only"] = True
    rows = [it.record() for it in items]
    rows.append({"task": "molecule-design", "prompt": "p", "completion": "C", "meta": {"formula": "CH4"}})
    data = root / "peptides-test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base_dir, root / "ck", data, items


def rows_of(output: str, metric: str) -> dict[str, list[str]]:
    """model -> [mean, interval, n] cells of a metric's rows in the printed table."""
    out = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith(metric):
            out[cells[1]] = cells[2:]
    return out


def test_eval_with_baselines_prints_intervals_n_and_the_paired_difference(setup):
    base_dir, ck, data, items = setup
    args = ["eval", "--checkpoint", str(ck), "--task", "peptides", "--data", str(data), "--base", str(base_dir)]
    r = runner.invoke(app, args + ["--baselines", "--resamples", "200"])
    assert r.exit_code == 0, r.output
    assert "6 items scored by loss, 4 answers generated" in r.output
    loss = rows_of(r.output, "eval_loss")
    assert [m for m in loss if not m.startswith("X-LoRA minus")] == MODELS
    for model in MODELS:
        mean, interval, n = loss[model]
        low, high = map(float, re.fullmatch(r"\[(.+), (.+)\]", interval).groups())
        assert low <= float(mean) <= high and n == "6"
    acc = rows_of(r.output, "amp_accuracy")
    assert all(acc[m][2] == "2" for m in MODELS)  # 2 generated classification items
    assert rows_of(r.output, "design_satisfied_rate")["base"][2] == "2"
    # X-LoRA minus the best single expert on the loss: a paired difference over the same 6 items
    (diff_name,) = [m for m in loss if m.startswith("X-LoRA minus expert")]
    assert "paired" in diff_name and loss[diff_name][2] == "6"
    mean, interval, _ = loss[diff_name]
    low, high = map(float, re.fullmatch(r"\[(.+), (.+)\]", interval).groups())
    verdict = "clearly worse" if low > 0 else "clearly better" if high < 0 else "no clear difference"
    assert verdict in diff_name and low <= float(mean) <= high
    # the printed loss is the token-weighted cross-entropy of the whole file (evaluate.eval_loss)
    from xlora.science.eval.evaluate import eval_loss
    from xlora.science.recipe.pipeline import chat_record, write_jsonl

    chat = data.parent / "chat.jsonl"
    write_jsonl(chat, [chat_record(it) for it in items])
    model = XLoraModel.from_pretrained(load_base(base_dir), ck).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert float(loss["X-LoRA"][0]) == pytest.approx(eval_loss(model, tok, chat), abs=6e-4)
    with model.disable_experts():
        assert float(loss["base"][0]) == pytest.approx(eval_loss(model, tok, chat), abs=6e-4)
    # without --baselines only the checkpoint; the same seed gives the same interval
    alone = runner.invoke(app, args + ["--resamples", "200"])
    assert alone.exit_code == 0, alone.output
    assert list(rows_of(alone.output, "eval_loss")) == ["X-LoRA"]
    assert rows_of(alone.output, "eval_loss")["X-LoRA"] == loss["X-LoRA"]
    # --models: only the named baselines, each row as in the full run; X-LoRA minus the best of them
    some = runner.invoke(app, args + ["--resamples", "200", "--models", "prot, uniform"])
    assert some.exit_code == 0, some.output
    picked = rows_of(some.output, "eval_loss")
    assert [m for m in picked if not m.startswith("X-LoRA minus")] == ["expert prot", "uniform mix (1/N)", "X-LoRA"]
    assert any(m.startswith("X-LoRA minus expert prot (paired") for m in picked)
    assert all(picked[m] == loss[m] for m in ("expert prot", "uniform mix (1/N)", "X-LoRA"))


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_eval_errors_are_one_line(setup, tmp_path):
    base_dir, ck, data, _ = setup
    common = ["--base", str(base_dir), "--checkpoint", str(ck)]
    assert "--task: expected one of" in one_error_line(
        runner.invoke(app, ["eval", *common, "--task", "chemistry", "--data", str(data)])
    )
    assert "no records for task molecule-properties" in one_error_line(
        runner.invoke(app, ["eval", *common, "--task", "molecule-properties", "--data", str(data)])
    )
    assert "No such file" in one_error_line(
        runner.invoke(app, ["eval", *common, "--task", "peptides", "--data", str(tmp_path / "none.jsonl")])
    )
    assert "--limit" in one_error_line(
        runner.invoke(app, ["eval", *common, "--task", "peptides", "--data", str(data), "--limit", "0"])
    )
    assert "--models: unknown chemistry; expected base, uniform or one of the experts chem" in one_error_line(
        runner.invoke(app, ["eval", *common, "--task", "peptides", "--data", str(data), "--models", "base,chemistry"])
    )
    assert "--models and --baselines" in one_error_line(
        runner.invoke(
            app, ["eval", *common, "--task", "peptides", "--data", str(data), "--models", "base", "--baselines"]
        )
    )
    assert "--models: expected comma-separated names" in one_error_line(
        runner.invoke(app, ["eval", *common, "--task", "peptides", "--data", str(data), "--models", " , "])
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task": "peptides", "prompt": "p", "completion": "c", "meta": {"kind": "x"}}) + "\n")
    assert "meta 'kind' must be" in one_error_line(
        runner.invoke(app, ["eval", *common, "--task", "peptides", "--data", str(bad)])
    )
    for record, message in (
        ({"task": "peptides", "prompt": "p", "completion": "c", "meta": "oops"}, "field 'meta': expected an object"),
        ({"task": "peptides", "prompt": 3, "completion": "c", "meta": {}}, "field 'prompt': expected text, got 3"),
        (["peptides", "p"], "expected a JSON object, got list"),
    ):
        bad.write_text(json.dumps(record) + "\n")
        assert f"{bad}:1: {message}" in one_error_line(
            runner.invoke(app, ["eval", *common, "--task", "peptides", "--data", str(bad)])
        )
    bad.write_bytes(b'{"task": "peptides", "prompt": "p \xff", "completion": "c", "meta": {}}\n')
    assert f"{bad}:1: not valid UTF-8 (byte 0xff" in one_error_line(
        runner.invoke(app, ["eval", *common, "--task", "peptides", "--data", str(bad)])
    )
    nan = {"task": "molecule-properties", "prompt": "p", "completion": "c", "meta": {"gap": float("nan"), "dipole": 1}}
    bad.write_text(json.dumps(nan) + "\n")
    assert "meta 'gap' must be a finite number, got nan" in one_error_line(
        runner.invoke(app, ["eval", *common, "--task", "molecule-properties", "--data", str(bad)])
    )
    bad.write_text("{not json\n")
    assert f"{bad}:1: not a JSON record" in one_error_line(
        runner.invoke(app, ["eval", *common, "--task", "peptides", "--data", str(bad)])
    )


def test_make_test_sets_for_the_shipped_checkpoint(tmp_path):
    r = runner.invoke(app, ["make-test-sets", "--out", str(tmp_path), "--n-loss", "20", "--n-generate", "5"])
    assert r.exit_code == 0, r.output
    assert "unseen by the run" in r.output
    lines = (tmp_path / "molecule-properties-test.jsonl").read_text().splitlines()
    assert len(lines) == 20 and sum("loss_only" not in line for line in lines) == 5
    assert "n_generate <= n_loss / 2" in one_error_line(
        runner.invoke(app, ["make-test-sets", "--out", str(tmp_path), "--n-loss", "20", "--n-generate", "11"])
    )
