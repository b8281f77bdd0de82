"""Native checkpoints: layout, bit-exact round trip, atomic writes, clear errors on bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import load_base, sharpen
from safetensors.torch import load_file, save_file

from xlora import CheckpointError, ExpertError, XLoraConfig, XLoraModel


@pytest.fixture
def model(tiny) -> XLoraModel:
    base_dir, experts = tiny
    m = XLoraModel.from_experts(
        load_base(base_dir), experts, XLoraConfig(xlora_depth=3, xlora_size=16, layerwise_scalings=True)
    )
    sharpen(m, 0.5, seed=2)
    return m


def test_layout_and_bit_exact_roundtrip(model, tiny, tmp_path, padded_batch):
    base_dir, experts = tiny
    ck = model.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in ck.iterdir()) == [
        "chem",
        "cot",
        "prot",
        "xlora_classifier.safetensors",
        "xlora_config.json",
    ]
    cfg = json.loads((ck / "xlora_config.json").read_text())
    assert cfg["adapters"] == ["chem", "prot", "cot"] and cfg["xlora_depth"] == 3 and cfg["hidden_size"] == 64
    assert cfg["base_model_id"] == str(base_dir)
    # the original package's classifier key names: inner.{0,3} (Linear, ReLU, Dropout), last
    keys = sorted(load_file(str(ck / "xlora_classifier.safetensors")))
    assert keys == ["inner.0.bias", "inner.0.weight", "inner.3.bias", "inner.3.weight", "last.bias", "last.weight"]
    for name in ("chem", "prot", "cot"):
        assert (ck / name / "adapter_model.safetensors").read_bytes() == (
            experts[name] / "adapter_model.safetensors"
        ).read_bytes()
    again = XLoraModel.from_pretrained(load_base(base_dir), ck)
    ids, mask = padded_batch
    with torch.no_grad():
        assert torch.equal(
            again(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )
    assert again.expert_names == model.expert_names and again.config == model.config


def test_adapters_override_and_order(model, tiny, tmp_path):
    base_dir, experts = tiny
    ck = model.save_pretrained(tmp_path / "ck")
    shutil.rmtree(ck / "chem")
    with pytest.raises(CheckpointError, match="adapter folder chem/ for expert 'chem' is missing"):
        XLoraModel.from_pretrained(load_base(base_dir), ck)
    again = XLoraModel.from_pretrained(load_base(base_dir), ck, adapters=experts)
    assert again.expert_names == ["chem", "prot", "cot"]
    with pytest.raises(ExpertError, match="in this order"):
        XLoraModel.from_pretrained(load_base(base_dir), ck, adapters={"prot": experts["prot"]})


def test_overwrite_and_atomicity(model, tmp_path):
    target = tmp_path / "ck"
    model.save_pretrained(target)
    with pytest.raises(FileExistsError):
        model.save_pretrained(target, overwrite=False)
    model.save_pretrained(target)  # replacing works, and leaves no temporary folders behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    # a failure half-way leaves neither a half-written checkpoint nor temporary folders
    model.expert_sources["cot"] = (tmp_path / "gone", {})
    model.config.use_trainable_adapters = False
    (tmp_path / "gone").mkdir()
    import xlora.formats.native as io

    original = io.write_expert_from_model

    def boom(m, i, dest):
        if i == 2:
            raise OSError("disk full")
        original(m, i, dest)

    io.write_expert_from_model = boom
    try:
        with pytest.raises(OSError, match="disk full"):
            model.save_pretrained(tmp_path / "new")
    finally:
        io.write_expert_from_model = original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "gone"]


def test_missing_or_wrong_classifier(model, tiny, tmp_path):
    base_dir, _ = tiny
    ck = model.save_pretrained(tmp_path / "ck")
    state = load_file(str(ck / "xlora_classifier.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("last")}, str(ck / "xlora_classifier.safetensors"))
    base = load_base(base_dir)
    with pytest.raises(CheckpointError, match="classifier weights missing .*last.*random weights"):
        XLoraModel.from_pretrained(base, ck)
    assert not any("base_layer" in n for n, _ in base.named_modules()), "a failed load must not wrap the base"
    (ck / "xlora_classifier.safetensors").unlink()
    with pytest.raises(CheckpointError, match="classifier weights missing"):
        XLoraModel.from_pretrained(load_base(base_dir), ck)
    # a classifier for another number of experts
    bad = dict(state)
    bad["last.weight"] = torch.zeros(2 * 14, 16)
    bad["last.bias"] = torch.zeros(2 * 14)
    save_file(bad, str(ck / "xlora_classifier.safetensors"))
    with pytest.raises(CheckpointError, match=r"has shape \(28.*expected \(42.*for 3 experts, 14 adapted modules"):
        XLoraModel.from_pretrained(load_base(base_dir), ck)


def test_pt_classifier_and_peft_keys(model, tiny, tmp_path, padded_batch):
    """A `.pt` state dict with PEFT's `layers.{i}` keys loads as well."""
    base_dir, _ = tiny
    ck = model.save_pretrained(tmp_path / "ck")
    (ck / "xlora_classifier.safetensors").unlink()
    torch.save(model.classifier.state_dict(), ck / "xlora_classifier.pt")
    again = XLoraModel.from_pretrained(load_base(base_dir), ck)
    ids, _ = padded_batch
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    torch.save({"not": "tensors"}, ck / "xlora_classifier.pt")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        XLoraModel.from_pretrained(load_base(base_dir), ck)


def test_trainable_adapters_are_saved_from_memory(tiny, tmp_path, padded_batch):
    base_dir, experts = tiny
    m = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(use_trainable_adapters=True))
    with torch.no_grad():
        m.xlora_layers[0].lora_A.mul_(2.0)  # "training" changed an expert
    ck = m.save_pretrained(tmp_path / "ck")
    again = XLoraModel.from_pretrained(load_base(base_dir), ck)
    ids, _ = padded_batch
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, m(input_ids=ids).logits)


def test_bad_config_file(model, tiny, tmp_path):
    base_dir, _ = tiny
    ck = model.save_pretrained(tmp_path / "ck")
    cfg = json.loads((ck / "xlora_config.json").read_text())
    cfg["mystery"] = 1
    (ck / "xlora_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown X-LoRA config field\\(s\\) mystery"):
        XLoraModel.from_pretrained(load_base(base_dir), ck)
    with pytest.raises(CheckpointError, match="no xlora_config.json"):
        XLoraModel.from_pretrained(load_base(base_dir), tmp_path)
