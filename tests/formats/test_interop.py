"""Interop: PEFT X-LoRA directories in and out, the original package's layout, the mistral.rs
ordering file, the drop-in API and `xlora convert`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import load_base, make_adapter, sharpen
from peft import PeftModel, get_peft_model
from peft import XLoraConfig as PeftXLoraConfig
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import xlora
from xlora import CheckpointError, XLoraConfig, XLoraModel
from xlora.cli import app

runner = CliRunner()


@pytest.fixture
def model(tiny) -> XLoraModel:
    base_dir, experts = tiny
    cfg = XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True, softmax_temperature=0.7)
    m = XLoraModel.from_experts(load_base(base_dir), experts, cfg)
    sharpen(m, 0.5, seed=4)
    return m


def peft_xlora(base_dir, experts):
    """PEFT's own X-LoRA model over the tiny experts (PEFT needs the names "0".."N-1")."""
    cfg = PeftXLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=64,
        xlora_depth=2,
        xlora_size=16,
        adapters={str(i): str(p) for i, p in enumerate(experts.values())},
    )
    return get_peft_model(load_base(base_dir), cfg)


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_peft_loads_what_we_write(model, tiny, tmp_path, padded_batch):
    base_dir, _ = tiny
    out = model.save_pretrained(tmp_path / "peft", format="peft")
    peft_model = PeftModel.from_pretrained(load_base(base_dir), out).eval()
    ids, mask = padded_batch
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_roundtrip_native_peft_native_bit_exact(model, tiny, tmp_path, padded_batch):
    base_dir, _ = tiny
    ids, _ = padded_batch
    ref = logits(model, ids)
    model.save_pretrained(tmp_path / "native")
    r = runner.invoke(app, ["convert", str(tmp_path / "native"), str(tmp_path / "peft"), "--to", "peft"])
    assert r.exit_code == 0, r.output
    assert "inner.0.weight" in r.output and "base_model.internal_xlora_classifier.layers.0.weight" in r.output
    from_peft = XLoraModel.from_pretrained(load_base(base_dir), tmp_path / "peft")
    assert from_peft.expert_names == ["chem", "prot", "cot"]  # real names survive PEFT's "0".."N-1"
    assert torch.equal(logits(from_peft, ids), ref)
    r = runner.invoke(app, ["convert", str(tmp_path / "peft"), str(tmp_path / "back"), "--to", "native"])
    assert r.exit_code == 0, r.output
    back = XLoraModel.from_pretrained(load_base(base_dir), tmp_path / "back")
    assert torch.equal(logits(back, ids), ref)
    assert json.loads((tmp_path / "back" / "xlora_config.json").read_text())["adapters"] == ["chem", "prot", "cot"]
    # the destination exists: refused without --overwrite, nothing changed
    r = runner.invoke(app, ["convert", str(tmp_path / "peft"), str(tmp_path / "back"), "--to", "native"])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "peft"), str(tmp_path / "back"), "--overwrite"])
    assert r.exit_code == 0


def test_original_key_names_roundtrip(model, tiny, tmp_path, padded_batch):
    """Native files use the original's `inner.{i}`/`last` keys; PEFT-keyed files load identically."""
    base_dir, _ = tiny
    ids, _ = padded_batch
    ck = model.save_pretrained(tmp_path / "ck")
    state = load_file(str(ck / "xlora_classifier.safetensors"))
    assert sorted(state) == ["inner.0.bias", "inner.0.weight", "last.bias", "last.weight"]
    save_file(
        {
            "layers.0.weight": state["inner.0.weight"],
            "layers.0.bias": state["inner.0.bias"],
            "layers.3.weight": state["last.weight"],
            "layers.3.bias": state["last.bias"],
        },
        str(ck / "xlora_classifier.safetensors"),
    )
    assert torch.equal(logits(XLoraModel.from_pretrained(load_base(base_dir), ck), ids), logits(model, ids))


def test_original_layout_fixture(tiny, tmp_path, padded_batch):
    """A lamm-mit/x-lora style directory: adapter_1.. folders, a `.pt` classifier, the original's
    config fields (device, base_model_id, adapters as a dict), no ReLU/Dropout, no bias."""
    base_dir, experts = tiny
    cfg = XLoraConfig(xlora_depth=3, xlora_size=8, enable_relu_and_dropout=False, use_bias=False)
    ours = XLoraModel.from_experts(
        load_base(base_dir), {f"adapter_{i + 1}": p for i, p in enumerate(experts.values())}, cfg
    )
    ck = ours.save_pretrained(tmp_path / "orig")
    state = load_file(str(ck / "xlora_classifier.safetensors"))
    assert sorted(state) == ["inner.0.weight", "inner.1.weight", "last.weight"]
    (ck / "xlora_classifier.safetensors").unlink()
    torch.save(state, ck / "xlora_classifier.pt")
    conf = json.loads((ck / "xlora_config.json").read_text())
    conf.pop("reuse_scalings_after")
    conf.pop("xlora_format")
    conf["device"] = "cpu"
    conf["adapters"] = {name: f"/elsewhere/{name}" for name in conf["adapters"]}
    (ck / "xlora_config.json").write_text(json.dumps(conf))
    again = xlora.from_pretrained(ck, load_base(base_dir), "cpu")
    ids, _ = padded_batch
    assert again.expert_names == ["adapter_1", "adapter_2", "adapter_3"]
    assert torch.equal(logits(again, ids), logits(ours, ids))


def test_peft_checkpoint_missing_classifier_is_refused(tiny, tmp_path):
    """PEFT 0.21 writes X-LoRA directories with part of the classifier: we must refuse them."""
    base_dir, experts = tiny
    peft_xlora(base_dir, experts).save_pretrained(tmp_path / "peft_saved")
    keys = load_file(str(tmp_path / "peft_saved" / "adapter_model.safetensors"))
    assert not any("layers.0" in k for k in keys), "PEFT fixed its save bug: update this test"
    base = load_base(base_dir)
    with pytest.raises(CheckpointError, match=r"classifier weights missing \(layers.0.bias, layers.0.weight\).*PEFT"):
        XLoraModel.from_pretrained(base, tmp_path / "peft_saved")
    assert not any("base_layer" in n for n, _ in base.named_modules())


def test_peft_directory_with_full_classifier_loads(tiny, tmp_path, padded_batch):
    """A PEFT directory whose classifier is complete (as PEFT < 0.20 wrote) loads, with `adapters`
    overriding the stored paths, and equals PEFT's own model."""
    base_dir, experts = tiny
    pm = peft_xlora(base_dir, experts).eval()
    pm.save_pretrained(tmp_path / "p")
    full = {k: v for k, v in pm.state_dict().items() if "internal_xlora_classifier" in k}
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "p" / "adapter_model.safetensors"))
    for i in range(3):
        shutil.rmtree(tmp_path / "p" / str(i))
    moved = {str(i): tmp_path / f"moved{i}" for i in range(3)}
    for i, src in zip(range(3), experts.values()):
        shutil.copytree(src, moved[str(i)])
    ours = XLoraModel.from_pretrained(load_base(base_dir), tmp_path / "p", adapters=moved)
    ids, _ = padded_batch
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), atol=1e-5, rtol=1e-5)


def test_bad_inputs(model, tiny, tmp_path):
    base_dir, experts = tiny
    ck = model.save_pretrained(tmp_path / "ck")
    # unknown peft_type
    bad = tmp_path / "ia3"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type 'IA3' is not an X-LoRA checkpoint"):
        XLoraModel.from_pretrained(load_base(base_dir), bad)
    # config naming another number of experts than the classifier has
    conf = json.loads((ck / "xlora_config.json").read_text())
    two = tmp_path / "two"
    shutil.copytree(ck, two)
    conf["adapters"] = ["chem", "prot"]
    (two / "xlora_config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="for 2 experts"):
        XLoraModel.from_pretrained(load_base(base_dir), two)
    r = runner.invoke(app, ["convert", str(two), str(tmp_path / "out"), "--to", "peft"])
    assert r.exit_code == 2 and "for 2 experts" in r.output and not (tmp_path / "out").exists()
    # a classifier for another hidden size
    hid = tmp_path / "hid"
    shutil.copytree(ck, hid)
    conf = json.loads((hid / "xlora_config.json").read_text())
    conf["hidden_size"] = 32
    (hid / "xlora_config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="hidden size 32"):
        XLoraModel.from_pretrained(load_base(base_dir), hid)
    # names colliding after sanitising (PEFT keys are free-form)
    peft_dir = model.save_pretrained(tmp_path / "pd", format="peft")
    (peft_dir / "xlora_expert_names.json").unlink()
    conf = json.loads((peft_dir / "adapter_config.json").read_text())
    conf["adapters"] = {"a/b": conf["adapters"]["0"], "a:b": conf["adapters"]["1"], "c": conf["adapters"]["2"]}
    (peft_dir / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="'a/b' and 'a:b' both become 'a_b'"):
        XLoraModel.from_pretrained(load_base(base_dir), peft_dir)
    # options PEFT cannot express
    nb = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(use_bias=False))
    with pytest.raises(CheckpointError, match="use_bias=False cannot be written in PEFT format"):
        nb.save_pretrained(tmp_path / "nb", format="peft")
    assert not (tmp_path / "nb").exists()


def test_export_ordering_matches_named_modules(tiny, tmp_path):
    base_dir, experts = tiny
    extra = make_adapter(base_dir, tmp_path / "mlp", 2, 4, ["gate_proj"], seed=5)
    m = XLoraModel.from_experts(load_base(base_dir), {"chem": experts["chem"], "mlp": extra})
    ck = m.save_pretrained(tmp_path / "ck")
    r = runner.invoke(app, ["export-ordering", str(ck), "-o", str(tmp_path / "ordering.json")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "ordering.json").read_text())
    assert data["order"] == ["chem", "mlp"] and data["base_model_id"] == str(base_dir)
    wanted = {"q_proj", "v_proj", "down_proj", "gate_proj"}
    named = [n for n, _ in load_base(base_dir).named_modules() if n.rsplit(".", 1)[-1] in wanted]
    assert list(data["layers"]) == named == m.module_names
    assert list(data["layers"].values()) == list(range(len(named)))


def test_drop_in_add_xlora_to_model(tiny, padded_batch):
    base_dir, experts = tiny
    cfg = xlora.xLoRAConfig(
        hidden_size=64,
        base_model_id=str(base_dir),
        device="cpu",
        adapters={k: str(v) for k, v in experts.items()},
        xlora_depth=2,
        xlora_size=8,
    )
    m = xlora.add_xlora_to_model(load_base(base_dir), cfg, verbose=False)
    assert isinstance(m, XLoraModel) and m.expert_names == ["chem", "prot", "cot"]
    assert m.config.xlora_depth == 2 and m.base_model_id == str(base_dir)
    ids, _ = padded_batch
    assert logits(m, ids).shape == (3, 12, 128)
