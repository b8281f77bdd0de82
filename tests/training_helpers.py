"""Shared pieces of the training tests: a tiny gate model, a library run and the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import load_base
from transformers import AutoTokenizer

from xlora import XLoraConfig, XLoraModel
from xlora.train import train_gate
from xlora.train.data import load_dataset
from xlora.train.loop import TrainingArgs

ROOT = Path(__file__).resolve().parents[1]


def gate_model(base_dir, experts, dropout=0.0):
    torch.manual_seed(0)
    cfg = XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True, xlora_dropout_p=dropout)
    return XLoraModel.from_experts(load_base(base_dir), experts, cfg)


def run_gate(train_setup, out, **kw):
    base_dir, experts, data, ev = train_setup
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = gate_model(base_dir, experts, dropout=kw.pop("dropout", 0.0))
    args = TrainingArgs(**{"output_dir": str(out), "batch_size": 4, "lr": 5e-3, "seed": 3, "progress": False, **kw})
    records = train_gate(model, load_dataset(data, tok), load_dataset(ev, tok), args, pad_token_id=0)
    return model, records


CLI_MAIN = "import sys\nfrom xlora.cli import main\nsys.argv = ['xlora', *sys.argv[1:]]\nmain()\n"


def cli(*args, env=None, timeout=300, inject=None):
    """Run `xlora ARGS` in a subprocess; `inject`: Python source run first (a fault the test injects, such as
    helpers.kill_at_save_step or helpers.kill_after_training_step)."""
    command = ["-m", "xlora.cli"] if inject is None else ["-c", inject + CLI_MAIN]
    return subprocess.run(
        [sys.executable, *command, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=ROOT,
    )


def gate_cli_args(train_setup, out, *extra):
    base_dir, experts, data, ev = train_setup
    args = [
        "train-gate",
        "--base",
        str(base_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--size",
        "16",
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--seed",
        "1",
        "--dropout",
        "0.1",
    ]
    for name, path in experts.items():
        args += ["--experts", f"{name}={path}"]
    return args + list(extra)
