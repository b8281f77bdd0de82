"""XLoraModel behaviour: freezing, padding, embeddings, masking, disabling, the scalings API."""

from __future__ import annotations

import pytest
import torch
from helpers import load_base, sharpen

from xlora import XLoraConfig, XLoraConfigError, XLoraModel, load_scalings_log


@pytest.fixture
def model(tiny) -> XLoraModel:
    base_dir, experts = tiny
    cfg = XLoraConfig(xlora_depth=2, xlora_size=32, layerwise_scalings=True, xlora_dropout_p=0.1)
    m = XLoraModel.from_experts(load_base(base_dir), experts, cfg)
    sharpen(m, 0.5, seed=1)
    return m


def trainable(m: XLoraModel) -> set[str]:
    return {n for n, p in m.named_parameters() if p.requires_grad}


def test_only_classifier_trainable_whatever_is_called(model, padded_batch):
    ids, mask = padded_batch
    expected = {n for n, _ in model.classifier.named_parameters(prefix="classifier")}
    assert trainable(model) == expected
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("classifier"))
    assert all(p.grad is not None for p in model.classifier.parameters())
    model.eval()
    model.generate(ids, attention_mask=mask, max_new_tokens=3)
    with model.disable_experts():
        model(input_ids=ids)
    model.mask_experts(["chem"])
    model(input_ids=ids)
    assert trainable(model) == expected


def test_trainable_adapters_option(tiny):
    base_dir, experts = tiny
    m = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(use_trainable_adapters=True))
    names = trainable(m)
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)
    assert not any("base_layer" in n or "embed" in n for n in names)


def test_expert_math_changes_output_and_disable_gives_base(model, padded_batch):
    ids, mask = padded_batch
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_experts():
            off = model(input_ids=ids, attention_mask=mask).logits
        plain = model.unload()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(off, plain)
    assert (mixed - plain).abs().max() > 1e-3


def test_inputs_embeds_equals_input_ids(model, padded_batch):
    ids, mask = padded_batch
    emb = model.base.get_input_embeddings()(ids)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(inputs_embeds=emb, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_right_padding_matches_unbatched(model):
    torch.manual_seed(3)
    seqs = [torch.randint(3, 128, (n,)) for n in (9, 5, 7)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None]).logits[0]
            torch.testing.assert_close(batched[i, : len(s)], alone, atol=1e-5, rtol=1e-5)


def test_mask_experts_zeroes_and_renormalises(model, padded_batch):
    ids, _ = padded_batch
    with torch.no_grad():
        model(input_ids=ids)
        full = model.get_latest_scalings()
        with model.mask_experts(["prot"]):
            model(input_ids=ids)
            masked = model.get_latest_scalings()
        model(input_ids=ids)
        after = model.get_latest_scalings()
    assert torch.equal(after, full)  # the context manager restored the mask
    assert torch.all(masked[..., 1] == 0)
    kept = full[..., [0, 2]]
    torch.testing.assert_close(masked[..., [0, 2]], kept / kept.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="unknown expert"):
        model.mask_experts(["nope"])
    with pytest.raises(ValueError, match="every expert"):
        model.mask_experts(["chem", "prot", "cot"])


def test_setters_and_validation(model, padded_batch):
    ids, _ = padded_batch
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.set_global_scaling_weight(0.0)
        assert model.get_global_scaling_weight() == 0.0
        with model.disable_experts():
            base = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, base)
        model.set_global_scaling_weight(1.0)
        assert torch.equal(model(input_ids=ids).logits, ref)
    model.set_topk_lora(2)
    with pytest.raises(XLoraConfigError, match="top_k_lora"):
        model.set_topk_lora(4)
    assert model.config.top_k_lora == 2
    model.set_scaling_pass_value(None)
    assert model.config.scaling_pass_value is None


def test_scalings_log_roundtrip(model, tmp_path, padded_batch):
    ids, mask = padded_batch
    model.enable_scalings_logging()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids[:, :5])
        model(input_ids=ids[:1])
    model.disable_scalings_logging()
    model(input_ids=ids[:1, :3])  # not logged
    log = model.get_scalings_log()
    assert [tuple(s.shape) for s in log] == [(3, 12, 14, 3), (3, 5, 14, 3), (1, 12, 14, 3)]
    buckets = model.get_bucketed_scalings_log()
    assert buckets[12][0] == [0, 2] and buckets[5][0] == [1]
    npz = model.flush_log_scalings(tmp_path / "log")
    assert npz.is_file() and model.get_scalings_log() == []
    entries, meta = load_scalings_log(tmp_path / "log")
    assert meta["expert_names"] == ["chem", "prot", "cot"] and len(meta["adapted_modules"]) == 14
    for a, b in zip(entries, log):
        assert torch.equal(a, b)
    model.enable_scalings_logging()
    model.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert [s.shape[1] for s in model.get_scalings_log()] == [12, 1, 1, 1]
    model.clear_scalings_log()
    assert model.get_scalings_log() == []


def test_hidden_size_mismatch_is_reported(tiny):
    base_dir, experts = tiny
    with pytest.raises(XLoraConfigError, match="hidden_size"):
        XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(hidden_size=99))
    with pytest.raises(XLoraConfigError, match="top_k_lora"):
        XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(top_k_lora=5))


def test_static_scalings_one_hot_is_the_plain_lora(tiny, padded_batch):
    """One-hot static weights = that expert applied alone at full strength (PEFT's LoraModel)."""
    from peft import PeftModel

    base_dir, experts = tiny
    m = XLoraModel.from_experts(load_base(base_dir), experts)
    ids, mask = padded_batch
    reference = PeftModel.from_pretrained(load_base(base_dir), experts["prot"]).eval()
    with torch.no_grad(), m.static_scalings([0.0, 1.0, 0.0]):
        got = m(input_ids=ids, attention_mask=mask).logits
        gen = m.generate(ids, attention_mask=mask, max_new_tokens=5)
        expected = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert gen.shape == (3, 17)
    with pytest.raises(ValueError, match="expected \\[3\\]"):
        with m.static_scalings([1.0, 0.0]):
            pass


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.set_global_scaling_weight(float("nan")), r"set_global_scaling_weight: weight .* got nan"),
        (lambda m: m.set_global_scaling_weight(float("inf")), r"set_global_scaling_weight: weight .* got inf"),
        (lambda m: m.set_global_scaling_weight("2"), r"set_global_scaling_weight: weight .* got '2'"),
        (lambda m: m.set_global_scaling_weight(1e30), r"set_global_scaling_weight: .*magnitude <= 10, got 1e\+30"),
        (lambda m: setattr(m.config, "softmax_temperature", 0), r"softmax_temperature: expected a number > 0"),
        (lambda m: setattr(m.config, "top_k_lora", 4), r"top_k_lora: expected at most the number of experts \(3\)"),
        (lambda m: m.set_scaling_pass_value(float("nan")), r"set_scaling_pass_value: value .* got nan"),
        (lambda m: m.set_scaling_pass_value(float("-inf")), r"set_scaling_pass_value: value .* got -inf"),
        (lambda m: m.set_topk_lora(0), r"set_topk_lora: value .*integer >= 1 and <= 3 or None, got 0"),
        (lambda m: m.set_topk_lora(1.5), r"set_topk_lora: value .* got 1\.5"),
        (lambda m: m.set_topk_lora(True), r"set_topk_lora: value .* got True"),
    ],
)
def test_setters_refuse_non_finite_and_out_of_range(model, padded_batch, call, message):
    ids, _ = padded_batch
    before = model.config.to_dict()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with pytest.raises(ValueError, match=message):
        call(model)
    assert model.config.to_dict() == before  # a refused value leaves the config as it was
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_mask_applies_to_static_scalings(tiny, padded_batch):
    """Masking an expert under static weights = the same static weights with that expert at 0."""
    base_dir, experts = tiny
    m = XLoraModel.from_experts(load_base(base_dir), experts)
    ids, mask = padded_batch
    with torch.no_grad():
        with m.static_scalings([0.0, 0.5, 0.0]):
            expected = m(input_ids=ids, attention_mask=mask).logits
        with m.static_scalings([0.3, 0.5, 0.7]), m.mask_experts(["chem", "cot"]):
            got = m(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_static_scalings_refuse_nan_and_wrong_layer_count(model):
    with pytest.raises(ValueError, match="must be finite"):
        with model.static_scalings([float("nan"), 0.5, 0.5]):
            pass
    with pytest.raises(ValueError, match=rf"expected \[3\] or \[{model.n_layers}, 3\] weights, got \[5, 3\]"):
        with model.static_scalings(torch.ones(5, 3)):
            pass


def test_mask_experts_single_name_and_bad_names(model, padded_batch):
    """A str is one expert name (not its letters); anything else unknown lists the valid names."""
    ids, _ = padded_batch
    with torch.no_grad():
        with model.mask_experts(["prot"]):
            model(input_ids=ids)
            as_list = model.get_latest_scalings()
        with model.mask_experts("prot"):
            model(input_ids=ids)
            assert torch.equal(model.get_latest_scalings(), as_list)
    valid = r"experts are \['chem', 'prot', 'cot'\]"
    for bad, what in ((["chemistry"], r"unknown expert\(s\) \['chemistry'\]"), ("", r"unknown expert\(s\) \[''\]")):
        with pytest.raises(ValueError, match=what + "; " + valid):
            model.mask_experts(bad)
    with pytest.raises(ValueError, match=r"expected expert names, got \[0\]; " + valid):
        model.mask_experts([0])
    assert model._expert_mask is None  # refused calls changed nothing
