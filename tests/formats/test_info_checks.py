"""`xlora info` runs the checks loading runs (no base model needed), so a checkpoint it shows is one
that loads; an unknown checkpoint format is refused by every reader."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from xlora.cli import app

runner = CliRunner()


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _nan_classifier(ck):
    f = ck / "xlora_classifier.safetensors"
    state = load_file(str(f))
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(f))


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda ck: _edit_json(ck / "chem" / "adapter_config.json", lora_alpha="x"), "field 'lora_alpha'"),
        (lambda ck: _edit_json(ck / "chem" / "adapter_config.json", use_dora=True), "DoRA adapters"),
        (lambda ck: _edit_json(ck / "chem" / "adapter_config.json", peft_type="IA3"), "peft_type 'IA3'"),
        (lambda ck: (ck / "xlora_classifier.safetensors").unlink(), "classifier"),
        (_nan_classifier, "holds NaN or infinite values"),
        (lambda ck: _edit_json(ck / "xlora_config.json", xlora_format=99), "'xlora_format' is 99, newer than this"),
    ],
)
def test_info_refuses_what_loading_refuses(tiny_checkpoint, tmp_path, break_it, message):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint[1], ck)
    assert runner.invoke(app, ["info", str(ck)]).exit_code == 0  # the intact copy is shown
    break_it(ck)
    r = runner.invoke(app, ["info", str(ck)])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
