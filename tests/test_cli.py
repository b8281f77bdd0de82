"""The `xlora` command line on a tiny local model with a word-level tokenizer."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import add_tiny_tokenizer, load_base
from typer.testing import CliRunner

from xlora import XLoraConfig, XLoraModel
from xlora.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tok_base(tiny):
    base_dir, experts = tiny
    add_tiny_tokenizer(base_dir)
    return base_dir, experts


def test_generate_with_experts_streams_and_summarises(tok_base):
    base_dir, experts = tok_base
    args = ["generate", "--base", str(base_dir), "--prompt", "w5 w6 w7", "--max-new-tokens", "6"]
    for name, path in experts.items():
        args += ["--experts", f"{name}={path}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"expert weights: chem=0\.\d{3}, prot=0\.\d{3}, cot=0\.\d{3}", result.output)
    assert re.search(r"w\d+", result.output.split("expert weights:")[0])  # streamed words


def test_generate_from_checkpoint_matches_library(tok_base, tmp_path):
    base_dir, experts = tok_base
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    model.save_pretrained(tmp_path / "ck")
    result = runner.invoke(
        app,
        [
            "generate",
            "--base",
            str(base_dir),
            "--checkpoint",
            str(tmp_path / "ck"),
            "-p",
            "w9",
            "--no-chat",
            "--max-new-tokens",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    out = model.generate(torch.tensor([[15]]), max_new_tokens=5, eos_token_id=1, pad_token_id=0)  # "w9"
    words = " ".join(f"w{t - 6}" for t in out[0, 1:].tolist() if t > 5)
    assert words in result.output


def test_generate_errors(tok_base, tmp_path):
    base_dir, experts = tok_base
    r = runner.invoke(app, ["generate", "--base", str(base_dir), "-p", "x", "--experts", "nodir"])
    assert r.exit_code == 2 and "expected NAME=DIR" in r.output
    r = runner.invoke(app, ["generate", "--base", str(base_dir), "-p", "x", "--experts", f"a={tmp_path}/missing"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["generate", "--base", str(tmp_path), "-p", "x"])
    assert r.exit_code == 2 and "not a local model directory" in r.output


def test_info(tok_base, tmp_path):
    base_dir, experts = tok_base
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(layerwise_scalings=True))
    model.save_pretrained(tmp_path / "ck")
    r = runner.invoke(app, ["info", str(tmp_path / "ck")])
    assert r.exit_code == 0, r.output
    assert "chem" in r.output and "q_proj,v_proj,down_proj".split(",")[0] in r.output
    assert "layerwise_scalings=True" in r.output
    r = runner.invoke(app, ["info", str(experts["cot"])])
    assert r.exit_code == 0 and "yes" in r.output  # rsLoRA
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "neither an X-LoRA checkpoint" in r.output
