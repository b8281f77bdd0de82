"""XLoraConfig validation and JSON round trip."""

from __future__ import annotations

import json

import pytest

from xlora import XLoraConfig, XLoraConfigError


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(xlora_depth=0), "xlora_depth"),
        (dict(xlora_depth=-2), "xlora_depth"),
        (dict(top_k_lora=0), "top_k_lora"),
        (dict(softmax_temperature=0), "softmax_temperature"),
        (dict(softmax_temperature=-1.0), "softmax_temperature"),
        (dict(xlora_dropout_p=1.0), "xlora_dropout_p"),
        (dict(xlora_dropout_p=-0.1), "xlora_dropout_p"),
        (dict(enable_softmax_topk=True), "enable_softmax_topk"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(xlora_size=0), "xlora_size"),
        (dict(use_bias="yes"), "use_bias"),
        (dict(reuse_scalings_after=0), "reuse_scalings_after"),
        (dict(global_scaling_weight=float("nan")), "global_scaling_weight"),
        (dict(scaling_pass_value="half"), "scaling_pass_value"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(XLoraConfigError, match=f"XLoraConfig.{field}: expected"):
        XLoraConfig(**kwargs)


def test_topk_bounded_by_experts():
    cfg = XLoraConfig(top_k_lora=3)
    cfg.validate(n_experts=3)
    with pytest.raises(XLoraConfigError, match="at most the number of experts"):
        cfg.validate(n_experts=2)


def test_json_roundtrip(tmp_path):
    cfg = XLoraConfig(
        hidden_size=64,
        xlora_depth=3,
        layerwise_scalings=True,
        top_k_lora=2,
        enable_softmax_topk=True,
        scaling_pass_value=None,
        reuse_scalings_after=4,
        use_bias=False,
    )
    path = tmp_path / "c.json"
    cfg.to_json_file(path, extra={"adapters": ["a"]})
    assert XLoraConfig.from_json_file(path, ignore=("adapters",)) == cfg
    assert json.loads(path.read_text())["adapters"] == ["a"]


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"xlora_depth": 2, "xlora_dept": 3, "foo": 1}))
    with pytest.raises(XLoraConfigError, match=r"unknown X-LoRA config field\(s\) foo, xlora_dept"):
        XLoraConfig.from_json_file(path)


def test_bad_json_names_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(XLoraConfigError, match="c.json: invalid JSON"):
        XLoraConfig.from_json_file(path)
    path.write_text(json.dumps({"xlora_depth": 0}))
    with pytest.raises(XLoraConfigError, match="c.json: XLoraConfig.xlora_depth"):
        XLoraConfig.from_json_file(path)


def test_assignments_after_construction_are_validated():
    """`config.softmax_temperature = 0` would give NaN scalings later; it fails now, and the old value stays."""
    cfg = XLoraConfig()
    with pytest.raises(XLoraConfigError, match=r"XLoraConfig.softmax_temperature: expected a number > 0, got 0"):
        cfg.softmax_temperature = 0
    assert cfg.softmax_temperature == 1.0
    with pytest.raises(XLoraConfigError, match="enable_softmax_topk: expected false unless top_k_lora is set"):
        cfg.enable_softmax_topk = True
    cfg.update(top_k_lora=2, enable_softmax_topk=True)  # dependent fields change together
    assert (cfg.top_k_lora, cfg.enable_softmax_topk) == (2, True)
    with pytest.raises(XLoraConfigError, match="unknown field"):
        cfg.update(temperature=2)


def test_global_scaling_weight_has_one_bound():
    """The server's bound is the library's: |w| <= MAX_GLOBAL_SCALING_WEIGHT (1e30 gives inf logits)."""
    from xlora.core.config import MAX_GLOBAL_SCALING_WEIGHT

    XLoraConfig(global_scaling_weight=-MAX_GLOBAL_SCALING_WEIGHT)
    for w in (1e30, MAX_GLOBAL_SCALING_WEIGHT * 1.01):
        with pytest.raises(XLoraConfigError, match="global_scaling_weight: expected a finite number with magnitude"):
            XLoraConfig(global_scaling_weight=w)
