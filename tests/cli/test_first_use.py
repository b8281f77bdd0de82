"""What a newcomer meets first: transformers-like defaults, clear advice, the shipped checkpoint anywhere."""

from __future__ import annotations

import pytest
import torch
from helpers import load_base
from typer.testing import CliRunner

from xlora import ExpertError, XLoraConfig, XLoraModel
from xlora.cli import app


def test_reusing_a_wrapped_base_says_what_to_do(tiny):
    base_dir, experts = tiny
    base = load_base(base_dir)
    first = XLoraModel.from_experts(base, experts, XLoraConfig())
    with pytest.raises(ExpertError, match=r"already carries X-LoRA.*\.unload\(\).*fresh base"):
        XLoraModel.from_experts(base, experts, XLoraConfig())
    n_layers = first.n_layers
    again = XLoraModel.from_experts(first.unload(), experts, XLoraConfig())  # as the message says
    assert again.n_layers == n_layers > 0


def test_generate_stops_at_the_base_models_eos_by_default(tiny):
    base_dir, experts = tiny
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig())
    ids = torch.tensor([[5, 9, 13, 17]])
    free = model.generate(ids, max_new_tokens=8, eos_token_id=[])  # never stops early
    assert free.shape[1] == 12
    stop = int(free[0, 6])  # the third new token becomes the model's end-of-sequence token
    first_hit = next(i for i in range(4, 12) if int(free[0, i]) == stop)
    model.base.generation_config.eos_token_id = stop
    model.base.generation_config.pad_token_id = 0
    out = model.generate(ids, max_new_tokens=8)
    assert out.shape[1] == first_hit + 1 and int(out[0, -1]) == stop  # as transformers' generate does
    assert torch.equal(out[0], free[0, : first_hit + 1])


def test_checkpoint_shipped_names_the_packaged_checkpoint():
    r = CliRunner().invoke(app, ["info", "shipped"])
    assert r.exit_code == 0, r.output
    assert "molecule-properties" in r.output and "peptides" in r.output


def test_verbose_flag_and_clean_help():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0 and "--verbose" in r.output and "<bool>" not in r.output


def test_a_tiny_sampling_temperature_is_greedy_not_nan(tiny):
    """transformers' warper divides raw logits (inf at T=1e-40); ours shifts the row maximum to 0 first."""
    base_dir, experts = tiny
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig())
    ids = torch.tensor([[5, 9, 13, 17]])
    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    tiny_t = model.generate(ids, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=1e-40, seed=0)
    assert torch.equal(tiny_t, greedy)
