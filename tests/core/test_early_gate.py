"""Early gate (`scaling_pass_layers=k`): the scaling pass runs k decoder layers, checked against a
k-layer model loaded independently by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_base, make_adapter, make_base, sharpen
from transformers import AutoModel

from xlora import XLoraConfig, XLoraModel
from xlora.core.config import CheckpointError, XLoraConfigError
from xlora.core.generation import SamplingOptions, iter_generate

LAYERS = 4


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer tiny Llama and two experts on every attention and MLP projection of it."""
    root = tmp_path_factory.mktemp("deep")
    base_dir = make_base(root / "base", seed=5, layers=LAYERS)
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    experts = {
        "a": make_adapter(base_dir, root / "a", 4, 8, targets, seed=11),
        "b": make_adapter(base_dir, root / "b", 2, 4, targets, seed=12),
    }
    return base_dir, experts


def build(deep, k, norm=True, value=0.0):
    base_dir, experts = deep
    cfg = XLoraConfig(
        xlora_depth=2,
        xlora_size=16,
        layerwise_scalings=True,
        scaling_pass_layers=k,
        scaling_pass_norm=norm,
        scaling_pass_value=value,
    )
    torch.manual_seed(0)
    return sharpen(XLoraModel.from_experts(load_base(base_dir), experts, cfg), seed=3)


IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_scalings_read_layer_k_of_an_independent_k_layer_model(deep, k):
    """Scaling pass value 0 = the plain base: its first k layers (+ final norm) are a k-layer model."""
    base_dir, _ = deep
    model = build(deep, k)
    with torch.no_grad():
        model(input_ids=IDS)
        truncated = AutoModel.from_pretrained(base_dir, num_hidden_layers=k, dtype=torch.float32).eval()
        hidden = truncated(input_ids=IDS).last_hidden_state  # [B, T, H], normed
        expected = model.classifier(hidden)
    torch.testing.assert_close(model.get_latest_scalings(), expected, rtol=1e-5, atol=1e-6)
    full = build(deep, None)
    with torch.no_grad():
        full(input_ids=IDS)
    assert (full.get_latest_scalings() - expected).abs().max() > 1e-3  # layer k is not layer L


def test_without_the_norm_the_classifier_reads_the_raw_residual_stream(deep):
    base_dir, _ = deep
    model = build(deep, 2, norm=False)
    with torch.no_grad():
        model(input_ids=IDS)
        states = load_base(base_dir)(input_ids=IDS, output_hidden_states=True).hidden_states
        expected = model.classifier(states[2])  # output of decoder layer 2, before any norm
    torch.testing.assert_close(model.get_latest_scalings(), expected, rtol=1e-5, atol=1e-6)
    assert model.base.base_model.norm.__class__.__name__ != "Identity"  # restored after the pass


def test_logits_are_the_real_pass_under_the_early_scalings(deep):
    """The real pass always runs every layer: logits = full model under the early gate's scalings."""
    early, full = build(deep, 2, value=None), build(deep, None, value=None)
    with torch.no_grad():
        logits = early(input_ids=IDS).logits
        scalings = early.get_latest_scalings()
        with full.apply_scalings(scalings):
            expected = full.base(input_ids=IDS).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_k_equal_to_all_layers_is_the_full_gate_exactly(deep):
    with torch.no_grad():
        a = build(deep, LAYERS, value=None)(input_ids=IDS).logits
        b = build(deep, None, value=None)(input_ids=IDS).logits
    assert torch.equal(a, b)


def test_only_k_layers_run_in_the_scaling_pass(deep):
    model = build(deep, 2)
    calls = [0] * LAYERS
    hooks = [
        layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.base.base_model.layers)
    ]
    with torch.no_grad():
        model(input_ids=IDS)
    for h in hooks:
        h.remove()
    assert calls == [2, 2, 1, 1]  # scaling pass + real pass for the first 2, real pass only after
    assert len(model.base.base_model.layers) == LAYERS


def test_cached_generation_equals_recomputation(deep, padded_batch):
    ids, mask = padded_batch
    model = build(deep, 2, value=None)
    opts = SamplingOptions(max_new_tokens=8, eos_token_id=[])

    def run(use_cache):
        steps = list(iter_generate(model, ids, mask, opts, use_cache=use_cache))
        return torch.stack([s.tokens for s in steps], 1), torch.stack([s.scalings for s in steps], 1)

    (tok_c, sc_c), (tok_u, sc_u) = run(True), run(False)
    assert torch.equal(tok_c, tok_u)
    torch.testing.assert_close(sc_c, sc_u, rtol=1e-4, atol=1e-5)


def test_round_trip_and_refusals(deep, tmp_path):
    base_dir, experts = deep
    model = build(deep, 3, norm=False)
    model.save_pretrained(tmp_path / "ck")
    stored = json.loads((tmp_path / "ck" / "xlora_config.json").read_text())
    assert stored["scaling_pass_layers"] == 3 and stored["scaling_pass_norm"] is False
    loaded = XLoraModel.from_pretrained(load_base(base_dir), tmp_path / "ck")
    assert loaded.config.scaling_pass_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    with pytest.raises(CheckpointError, match="scaling_pass_layers=3 .*PEFT format"):
        model.save_pretrained(tmp_path / "peft", format="peft")
    # full-pass gates keep files without the new fields (PEFT and the original package read them)
    build(deep, None).save_pretrained(tmp_path / "full")
    assert "scaling_pass_layers" not in json.loads((tmp_path / "full" / "xlora_config.json").read_text())
    with pytest.raises(XLoraConfigError, match=r"scaling_pass_layers: expected 1..4 .* got 5"):
        XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(scaling_pass_layers=5))
    with pytest.raises(XLoraConfigError, match="scaling_pass_layers: expected an integer >= 1"):
        XLoraConfig(scaling_pass_layers=0)


def test_train_gate_cli_writes_an_early_gate(train_setup, tmp_path):
    from training_helpers import cli, gate_cli_args

    result = cli(*gate_cli_args(train_setup, tmp_path / "g", "--steps", "3", "--scaling-pass-layers", "1"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "g" / "xlora_config.json").read_text())["scaling_pass_layers"] == 1
    bad = cli(*gate_cli_args(train_setup, tmp_path / "h", "--steps", "3", "--scaling-pass-layers", "9"))
    assert bad.returncode == 2 and "scaling_pass_layers: expected 1..2" in bad.stderr
