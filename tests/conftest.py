"""Shared fixtures: one tiny Llama and three PEFT experts per test session, built locally."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import add_tiny_tokenizer, make_base, make_experts  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(base model dir, {expert name: adapter dir}) with different ranks, alphas and targets."""
    root = tmp_path_factory.mktemp("tiny")
    base_dir = make_base(root / "base")
    return base_dir, make_experts(root, base_dir)


@pytest.fixture
def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of 3 sequences (lengths 12, 9, 5) over vocab 128."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 128, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(scope="module")
def train_setup(tiny, tmp_path_factory):
    """Tiny base with tokenizer, experts, and a learnable data set (each prompt maps to one answer)."""
    base_dir, experts = tiny
    add_tiny_tokenizer(base_dir)
    root = tmp_path_factory.mktemp("train")
    rows = []
    for i in range(48):
        a, b = 3 + i % 20, 3 + (i * 7) % 30
        rows.append({"prompt": f"w{a} w{b}", "completion": f"w{(a + b) % 40 + 10} w{a} w{b}"})
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = root / "eval.jsonl"
    ev.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    return base_dir, experts, data, ev


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny, tmp_path_factory):
    """(base dir with a tokenizer, saved X-LoRA checkpoint dir) over the tiny experts, for CLI tests."""
    from helpers import add_tiny_tokenizer, load_base

    from xlora import XLoraConfig, XLoraModel

    base_dir, experts = tiny
    add_tiny_tokenizer(base_dir)
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    path = tmp_path_factory.mktemp("checkpoint") / "ck"
    model.save_pretrained(path)
    return base_dir, path
