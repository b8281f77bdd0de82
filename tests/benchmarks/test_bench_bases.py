"""benchmarks/bases.py runs end to end on CPU with a tiny model (the README table comes from it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import add_tiny_tokenizer, load_base

from xlora import XLoraConfig, XLoraModel

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[2]


def test_bases_benchmark_prints_the_table(tiny, tmp_path):
    base_dir, experts = tiny
    add_tiny_tokenizer(base_dir)
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    ck = model.save_pretrained(tmp_path / "ck")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bases.py"), "--base", str(base_dir), "--checkpoint", str(ck)]
    cmd += ["--precisions", "fp32,int8", "--new-tokens", "3", "--repeats", "1", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| base | mean abs d-scalings | dominant agrees | greedy agrees")
    fp32, int8 = rows[1].split(" | "), rows[2].split(" | ")
    assert fp32[0] == "| fp32" and fp32[1:4] == ["0.0000", "1.000", "1.00"]  # fp32 against itself
    assert int8[0] == "| int8" and 0.0 < float(int8[1]) < 0.1  # 8-bit moves the routing a little
