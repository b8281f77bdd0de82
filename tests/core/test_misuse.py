"""Library calls of the wrong kind get an error naming the argument, never a stray AttributeError,
and a model whose base was given back by `unload()` refuses to run instead of being the base."""

from __future__ import annotations

import pytest
import torch
from helpers import load_base

from xlora import XLoraConfig, XLoraModel
from xlora.core.experts import ExpertError


@pytest.mark.parametrize(
    "spec, message",
    [
        ("chem_dir", r"got the path '.*chem' alone; name it"),
        ("paths", "got a list of PosixPath \\(name each adapter\\)"),
        (3, "experts: expected \\{name: adapter directory\\}.*got int"),
    ],
)
def test_expert_specs_of_the_wrong_form(tiny, spec, message):
    base_dir, experts = tiny
    given = {"chem_dir": str(experts["chem"]), "paths": list(experts.values())}.get(spec, spec)
    with pytest.raises(ExpertError, match=message):
        XLoraModel.from_experts(load_base(base_dir), given)


def test_arguments_of_the_wrong_kind_are_named(tiny):
    base_dir, experts = tiny
    with pytest.raises(TypeError, match="base: expected a transformers causal LM .*got NoneType"):
        XLoraModel.from_experts(None, experts)
    with pytest.raises(TypeError, match=r"config: expected an XLoraConfig, got dict \(use XLoraConfig\(\*\*d\)\)"):
        XLoraModel.from_experts(load_base(base_dir), experts, {"xlora_size": 8})
    with pytest.raises(TypeError, match="classifier_dtype: expected a floating torch dtype or None, got torch.int64"):
        XLoraModel.from_experts(load_base(base_dir), experts, classifier_dtype=torch.int64)
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(xlora_size=8))
    ids = torch.tensor([[6, 7, 8, 9]])
    with pytest.raises(
        ValueError, match=r"labels: expected integer token ids of shape \[1, 4\] like input_ids, got \[1, 2\]"
    ):
        model(input_ids=ids, labels=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="mask_experts: expected an expert name or a list of names, got 3"):
        model.mask_experts(3)
    with pytest.raises(ValueError, match=r"eos_token_id 1000000 is outside the vocabulary \(0\.\.127\)"):
        model.generate(ids, max_new_tokens=2, eos_token_id=10**6)


def test_an_unloaded_model_refuses_to_run(tiny, tmp_path):
    """After unload() the layers are gone: forward, generate and save would silently be the base model."""
    base_dir, experts = tiny
    model = XLoraModel.from_experts(load_base(base_dir), experts)
    base = model.unload()
    ids = torch.tensor([[6, 7, 8, 9]])
    for call in (
        lambda: model(input_ids=ids),
        lambda: model.generate(ids),
        lambda: model.save_pretrained(tmp_path / "x"),
    ):
        with pytest.raises(RuntimeError, match="unload\\(\\) gave its base model back"):
            call()
    assert not (tmp_path / "x").exists()
    base(input_ids=ids)  # the base model itself works
