"""Experts are read from PEFT directories and checked against the base model with clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import load_base, make_adapter, make_base
from safetensors.torch import load_file

from xlora import ExpertError, XLoraModel


def copy_adapter(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        from safetensors.torch import save_file

        t = load_file(str(dst / "adapter_model.safetensors"))
        save_file(edit_tensors(t), str(dst / "adapter_model.safetensors"))
    return dst


def test_numbering_follows_named_modules_and_targets(tiny):
    base_dir, experts = tiny
    m = XLoraModel.from_experts(load_base(base_dir), experts)
    order = [n for n, _ in m.base.named_modules() if n in set(m.module_names)]
    assert m.module_names == order and len(order) == 14  # cot targets all 7 projections x 2 blocks
    by_name = dict(zip(m.module_names, m.xlora_layers))
    # chem (r=4) q,v,down; prot (r=8) q,k,o,up; cot (r=2) all
    assert by_name["model.layers.0.self_attn.q_proj"].rank == 4 + 8 + 2
    assert by_name["model.layers.1.mlp.gate_proj"].rank == 2
    assert [layer.index for layer in m.xlora_layers] == list(range(14))


def test_bin_adapter_equals_safetensors(tiny, tmp_path):
    base_dir, experts = tiny
    src = experts["chem"]
    bin_dir = tmp_path / "chem_bin"
    bin_dir.mkdir()
    shutil.copy(src / "adapter_config.json", bin_dir)
    torch.save(load_file(str(src / "adapter_model.safetensors")), bin_dir / "adapter_model.bin")
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        a = XLoraModel.from_experts(load_base(base_dir), {"chem": src, "cot": experts["cot"]})
        b = XLoraModel.from_experts(load_base(base_dir), {"chem": bin_dir, "cot": experts["cot"]})
        b.classifier.load_state_dict(a.classifier.state_dict())
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_rank_and_alpha_patterns(tiny, tmp_path):
    base_dir, _ = tiny
    d = make_adapter(
        base_dir,
        tmp_path / "pat",
        4,
        8,
        ["q_proj", "v_proj"],
        seed=9,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"v_proj": 32},
    )
    m = XLoraModel.from_experts(load_base(base_dir), {"pat": d})
    layers = dict(zip(m.module_names, m.xlora_layers))
    v = layers["model.layers.0.self_attn.v_proj"]
    q = layers["model.layers.0.self_attn.q_proj"]
    assert v.rank == 2 and float(v.row_scale[0]) == pytest.approx(16.0)
    assert q.rank == 4 and float(q.row_scale[0]) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "edit_config, edit_tensors, message",
    [
        (lambda c: c.update(use_dora=True), None, "DoRA adapters .* are not supported"),
        (lambda c: c.update(modules_to_save=["lm_head"]), None, "modules_to_save"),
        (lambda c: c.update(peft_type="IA3"), None, "peft_type 'IA3'"),
        (lambda c: c.update(bias="all"), None, "trains biases"),
        (
            None,
            lambda t: {k.replace("layers.0", "layers.7"): v for k, v in t.items()},
            "target module model.layers.7.* does not exist",
        ),
        (None, lambda t: {k.replace("self_attn", "attn"): v for k, v in t.items()}, "does not exist"),
        (None, lambda t: {k: v for k, v in t.items() if "lora_B" not in k}, "has lora_A but no lora_B"),
        (None, lambda t: {**t, "base_model.model.lm_head.modules_to_save.weight": torch.zeros(2)}, "modules_to_save"),
        (
            lambda c: c.update(target_modules=["q_proj", "v_proj", "down_proj", "rotary_emb"]),
            lambda t: {k.replace("q_proj", "rotary_emb"): v for k, v in t.items()},
            "does not exist",
        ),
        # the config and the tensors disagree: PEFT would adapt k_proj and drop the q/v tensors
        (lambda c: c.update(target_modules=["k_proj"]), None, "is not matched by field 'target_modules'"),
        (lambda c: c.update(target_modules=r".*\.k_proj"), None, "is not matched by field 'target_modules'"),
        (lambda c: c.update(exclude_modules=["q_proj"]), None, "is excluded by field 'exclude_modules'"),
        (lambda c: c.update(layers_to_transform=[1]), None, "outside field 'layers_to_transform'"),
        (lambda c: c.update(target_modules=7), None, "field 'target_modules': expected a regex string or a list"),
        # finite but huge factors: the logits would be inf/NaN
        (None, lambda t: {k: v.fill_(3e38) if "lora_B" in k else v for k, v in t.items()}, "can change a weight"),
        (None, lambda t: {k: v * 1e4 for k, v in t.items()}, "can change a weight by up to"),
    ],
)
def test_bad_adapters(tiny, tmp_path, edit_config, edit_tensors, message):
    base_dir, experts = tiny
    bad = copy_adapter(experts["chem"], tmp_path / "bad", edit_config, edit_tensors)
    with pytest.raises(ExpertError, match=message):
        XLoraModel.from_experts(load_base(base_dir), {"ok": experts["cot"], "bad": bad})


def test_adapter_for_other_hidden_size(tiny, tmp_path):
    base_dir, _ = tiny
    other = make_base(tmp_path / "big", hidden=96)
    d = make_adapter(other, tmp_path / "big_adapter", 4, 8, ["q_proj"], seed=1)
    with pytest.raises(ExpertError, match=r"expects input 64 and output 64.*another hidden size"):
        XLoraModel.from_experts(load_base(base_dir), {"big": d})


def test_non_linear_target(tiny, tmp_path):
    base_dir, experts = tiny
    bad = copy_adapter(
        experts["chem"],
        tmp_path / "emb",
        edit_config=lambda c: c.update(target_modules=["q_proj", "v_proj", "down_proj", "input_layernorm"]),
        edit_tensors=lambda t: {k.replace("self_attn.q_proj", "input_layernorm"): v for k, v in t.items()},
    )
    with pytest.raises(ExpertError, match="is a LlamaRMSNorm; only nn.Linear"):
        XLoraModel.from_experts(load_base(base_dir), {"emb": bad})


def test_spec_errors(tiny, tmp_path):
    base_dir, experts = tiny
    base = load_base(base_dir)
    with pytest.raises(ExpertError, match="no experts given"):
        XLoraModel.from_experts(base, {})
    with pytest.raises(ExpertError, match="given twice"):
        XLoraModel.from_experts(base, [("a", experts["chem"]), ("a", experts["cot"])])
    with pytest.raises(ExpertError, match="expert name 'a/b'"):
        XLoraModel.from_experts(base, {"a/b": experts["chem"]})
    with pytest.raises(ExpertError, match="does not exist"):
        XLoraModel.from_experts(base, {"x": tmp_path / "missing"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertError, match="adapter_config.json: file not found"):
        XLoraModel.from_experts(base, {"x": tmp_path / "empty"})
    # nothing was wrapped by the failed attempts
    assert not any("base_layer" in n for n, _ in base.named_modules())


def test_gpt2_conv1d(tmp_path):
    """GPT-2 Conv1D modules (c_attn, c_fc) are adapted too. PEFT's X-LoRA cannot load GPT-2 adapters
    (its key rewriting assumes a `model.` prefix), so the oracle is PEFT's plain LoRA model: with one
    expert and softmax, every scaling is 1 and X-LoRA must equal that adapter applied fully."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64, use_cache=False)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")

    def base():
        return GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()

    lcfg = LoraConfig(
        r=3, lora_alpha=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False, fan_in_fan_out=True
    )
    get_peft_model(base(), lcfg).save_pretrained(tmp_path / "a0")
    reference = PeftModel.from_pretrained(base(), tmp_path / "a0").eval()
    ours = XLoraModel.from_experts(base(), {"only": tmp_path / "a0"})
    assert ours.module_names == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.mlp.c_fc",
    ]
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert (expected - base()(input_ids=ids).logits).abs().max() > 1e-3


def _poison(value: float, which: str):
    """Tensor edit: put `value` into the first lora_A or lora_B tensor."""

    def edit(t):
        key = sorted(k for k in t if which in k)[0]
        t[key] = t[key].clone()
        t[key][0, 0] = value
        return t

    return edit


@pytest.mark.parametrize(
    "edit_config, edit_tensors, message",
    [
        # non-finite or non-float tensors: refused at load, naming the file and the tensor
        (
            None,
            _poison(float("nan"), "lora_A"),
            r"adapter_model\.safetensors: tensor \S+lora_A\.weight has 1 non-finite",
        ),
        (
            None,
            _poison(float("inf"), "lora_B"),
            r"adapter_model\.safetensors: tensor \S+lora_B\.weight has 1 non-finite",
        ),
        (None, lambda t: {k: v.to(torch.int32) for k, v in t.items()}, r"tensor \S+ has dtype torch\.int32"),
        # adapter_config.json values: ExpertError naming the file and the field
        (lambda c: c.update(lora_alpha="sixteen"), None, r"adapter_config\.json: field 'lora_alpha': .*'sixteen'"),
        (lambda c: c.update(lora_alpha=None), None, r"adapter_config\.json: field 'lora_alpha': .*got None"),
        (lambda c: c.update(lora_alpha=0), None, r"field 'lora_alpha': expected a finite number > 0"),
        (
            lambda c: c.update(alpha_pattern={"v_proj(": 4}),
            None,
            r"adapter_config\.json: field 'alpha_pattern'.*v_proj\(",
        ),
        (lambda c: c.update(rank_pattern={"[q": 2}), None, r"adapter_config\.json: field 'rank_pattern'.*\[q"),
        (lambda c: c.update(alpha_pattern={"v_proj": "big"}), None, r"field \"alpha_pattern\['v_proj'\]\": .*'big'"),
        (lambda c: c.update(alpha_pattern=["v_proj"]), None, r"field 'alpha_pattern': expected an object"),
        (
            lambda c: c.update(rank_pattern={"v_proj": 2.5}),
            None,
            r"field \"rank_pattern\['v_proj'\]\": expected an int",
        ),
        (lambda c: c.update(r=0), None, r"adapter_config\.json: field 'r': expected an integer >= 1, got 0"),
        (lambda c: c.update(r="4"), None, r"field 'r': expected an integer >= 1, got '4'"),
        (lambda c: c.update(use_rslora="yes"), None, r"field 'use_rslora': expected true or false"),
        (lambda c: c.update(r=8), None, r"rank 4 in its tensors but \S+adapter_config\.json field 'r' says 8"),
        (lambda c: c.update(rank_pattern={"v_proj": 2}), None, r"field \"rank_pattern\['v_proj'\]\" says 2"),
        (
            lambda c: c.pop("r"),
            lambda t: {k: v[:0] if "lora_A" in k else v[:, :0] for k, v in t.items()},
            r"has rank 0 in \S+adapter_model\.safetensors",
        ),
    ],
)
def test_bad_values_name_file_and_field(tiny, tmp_path, edit_config, edit_tensors, message):
    base_dir, experts = tiny
    bad = copy_adapter(experts["chem"], tmp_path / "bad", edit_config, edit_tensors)
    with pytest.raises(ExpertError, match=r"expert 'bad': .*" + message):
        XLoraModel.from_experts(load_base(base_dir), {"ok": experts["cot"], "bad": bad})


def test_nan_in_bin_adapter(tiny, tmp_path):
    base_dir, experts = tiny
    d = tmp_path / "nanbin"
    d.mkdir()
    shutil.copy(experts["chem"] / "adapter_config.json", d)
    torch.save(
        _poison(float("nan"), "lora_B")(load_file(str(experts["chem"] / "adapter_model.safetensors"))),
        d / "adapter_model.bin",
    )
    with pytest.raises(ExpertError, match=r"adapter_model\.bin: tensor \S+lora_B\.weight has 1 non-finite"):
        XLoraModel.from_experts(load_base(base_dir), {"nanbin": d})


@pytest.mark.parametrize("cut", [lambda b: b[: len(b) // 2], lambda b: b[:5], lambda b: b"not a safetensors file" * 4])
def test_corrupt_safetensors_is_an_expert_error(tiny, tmp_path, cut):
    base_dir, experts = tiny
    d = copy_adapter(experts["chem"], tmp_path / "broken")
    f = d / "adapter_model.safetensors"
    f.write_bytes(cut(f.read_bytes()))
    with pytest.raises(ExpertError, match=r"expert 'broken': cannot read \S+broken/adapter_model\.safetensors"):
        XLoraModel.from_experts(load_base(base_dir), {"broken": d})


def test_embedding_adapter_says_embeddings_are_unsupported(tiny, tmp_path):
    """A real PEFT adapter targeting embed_tokens (keys `...embed_tokens.base_layer.weight`,
    `lora_embedding_A/B`, in that sorted order) must not be reported as "not a LoRA A/B weight"."""
    base_dir, _ = tiny
    with pytest.warns(UserWarning):  # PEFT: "Setting `save_embedding_layers` to `True`"
        d = make_adapter(base_dir, tmp_path / "emb", 4, 8, ["embed_tokens", "q_proj"], seed=5)
    assert any("lora_embedding_A" in k for k in load_file(str(d / "adapter_model.safetensors")))
    with pytest.raises(
        ExpertError, match=r"adapts the embedding model\.embed_tokens; embedding adapters are not supported"
    ):
        XLoraModel.from_experts(load_base(base_dir), {"emb": d})


def test_lm_head_adapter_matches_peft_and_a_foreign_head_is_refused(tiny, tmp_path):
    """PEFT saves a copy of a targeted lm_head (`lm_head.base_layer.weight`): equal to the base's, the
    adapter works (one expert under softmax = PEFT's plain LoRA, also when decoding with
    logits_to_keep); a different copy (another base model) is an error, never silently ignored."""
    from peft import PeftModel

    base_dir, experts = tiny
    with pytest.warns(UserWarning):
        d = make_adapter(base_dir, tmp_path / "head", 4, 8, ["lm_head", "q_proj"], seed=6)
    ids = torch.randint(3, 128, (2, 7))
    ours = XLoraModel.from_experts(load_base(base_dir), {"head": d})
    reference = PeftModel.from_pretrained(load_base(base_dir), d).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    two = XLoraModel.from_experts(load_base(base_dir), {"head": d, "chem": experts["chem"]})
    assert torch.equal(two.generate(ids, max_new_tokens=5), two.generate(ids, max_new_tokens=5, use_cache=False))

    other = copy_adapter(
        d, tmp_path / "other_head", edit_tensors=lambda t: {k: v + 1 if "base_layer" in k else v for k, v in t.items()}
    )
    with pytest.raises(ExpertError, match=r"lm_head\.base_layer\.weight differs from the base model's weight"):
        XLoraModel.from_experts(load_base(base_dir), {"other": other})


def test_ambiguous_tensors_and_mistyped_flags(tiny, tmp_path):
    base_dir, experts = tiny

    def twice(t):
        key = sorted(k for k in t if "lora_A" in k)[0]
        return {**t, key.replace("lora_A.weight", "lora_A.default.weight"): t[key].clone()}

    bad = copy_adapter(experts["chem"], tmp_path / "twice", edit_tensors=twice)
    with pytest.raises(ExpertError, match=r"adapter_model\.safetensors holds two lora_A tensors for model\.layers\.0"):
        XLoraModel.from_experts(load_base(base_dir), {"twice": bad})
    for field, value in (("use_dora", "false"), ("lora_bias", 0), ("bias", None)):
        edit = lambda c, f=field, v=value: c.update({f: v})  # noqa: E731
        bad = copy_adapter(experts["chem"], tmp_path / f"flag_{field}", edit_config=edit)
        with pytest.raises(ExpertError, match=rf"adapter_config\.json: field '{field}': expected"):
            XLoraModel.from_experts(load_base(base_dir), {"flag": bad})
