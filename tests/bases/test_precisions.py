"""Real bases: bf16/fp16 and bitsandbytes 8-bit / 4-bit base models under the mixture.

Oracle: PEFT's own LoRA on the *same* quantized or half-precision base. With fixed one-hot scalings
our X-LoRA is exactly that LoRA, so the two must agree up to float rounding in the compute dtype:
1e-5 when the experts compute in float32 (int8 / nf4 with float32 compute, a few ulp of values
below 1), 1e-2 in bfloat16 (its spacing is 2^-8 = 0.0039 for values in [0.5, 1): two roundings).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import add_tiny_tokenizer
from peft import PeftModel
from transformers import AutoTokenizer

from xlora import XLoraConfig, XLoraModel
from xlora.bases.loading import describe_base, load_base
from xlora.train import LoraOptions, train_expert, train_gate
from xlora.train.data import load_dataset
from xlora.train.loop import TrainingArgs

pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dev dependency; install '.[dev]'")

IDS = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
PRECISIONS = {  # name: (dtype, quantization, tolerance against PEFT on the same base)
    "bf16": ("bfloat16", None, 1e-2),
    "int8": ("float32", "int8", 1e-5),
    "nf4": ("float32", "nf4", 1e-5),
    "nf4-bf16": ("bfloat16", "nf4", 1e-2),
    "int8-bf16": ("bfloat16", "int8", 1e-2),
}


@pytest.fixture(autouse=True)
def _tokenizer(tiny):
    add_tiny_tokenizer(tiny[0])  # load_base loads a tokenizer beside the model


def logits(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits.float()


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_one_hot_mixture_equals_peft_lora_on_the_same_base(tiny, name):
    base_dir, experts = tiny
    dtype, quant, tol = PRECISIONS[name]
    peft_model = PeftModel.from_pretrained(load_base(base_dir, dtype=dtype, quantization=quant)[0], experts["prot"])
    expected = logits(peft_model.eval())
    model = XLoraModel.from_experts(load_base(base_dir, dtype=dtype, quantization=quant)[0], experts, XLoraConfig())
    layer = model.xlora_layers[0]
    if quant:  # the base layer stays quantized; the experts live in a float dtype
        assert type(layer.base_layer).__name__ in ("Linear8bitLt", "Linear4bit")
        assert not layer.base_layer.weight.is_floating_point()
    assert layer.lora_A.dtype == getattr(torch, dtype)
    assert model.classifier.layers[0].weight.dtype == torch.float32  # the gate stays float32
    with model.static_scalings([0.0, 1.0, 0.0]):
        got = logits(model)
    with model.disable_experts():
        plain = logits(model)
    assert (expected - plain).abs().max() > 10 * tol, "the expert must change the output for the test to mean anything"
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)


@pytest.mark.parametrize("name", ["int8", "nf4", "nf4-bf16", "int8-bf16"])
@pytest.mark.parametrize("trainable", [False, True])
def test_loss_in_grad_mode_on_a_quantized_base_equals_peft_lora(tiny, name, trainable):
    """A loss with autograd on (what a user computing a loss does, no `no_grad`): quantized layers
    return views made inside their autograd Function, which must not be modified in place."""
    base_dir, experts = tiny
    dtype, quant, tol = PRECISIONS[name]
    peft_model = PeftModel.from_pretrained(load_base(base_dir, dtype=dtype, quantization=quant)[0], experts["prot"])
    expected = peft_model.eval()(input_ids=IDS, labels=IDS).loss.float()
    cfg = XLoraConfig(use_trainable_adapters=trainable)
    model = XLoraModel.from_experts(load_base(base_dir, dtype=dtype, quantization=quant)[0], experts, cfg)
    with model.static_scalings([0.0, 1.0, 0.0]):
        loss = model(input_ids=IDS, labels=IDS).loss
    assert loss.requires_grad == trainable
    # a mean over the vocabulary's log-probabilities: bitsandbytes' grad-mode kernels differ by a few ulp
    torch.testing.assert_close(loss.float(), expected, atol=max(tol, 1e-4), rtol=0)
    out = model(input_ids=IDS, labels=IDS)  # the gate's scalings: a gradient reaches the classifier
    out.loss.backward()
    assert model.classifier.layers[0].weight.grad is not None
    assert torch.isfinite(model.classifier.layers[0].weight.grad).all()


def test_classifier_in_compute_dtype_on_request(tiny):
    base_dir, experts = tiny
    base = load_base(base_dir, dtype="bfloat16")[0]
    model = XLoraModel.from_experts(base, experts, XLoraConfig(), classifier_dtype=None)
    assert model.classifier.layers[0].weight.dtype == torch.bfloat16
    assert torch.isfinite(logits(model)).all()


def test_routing_on_quantized_bases_stays_close_to_fp32(tiny):
    """The same (random) gate routes nearly the same on an 8-bit base, and its scaling pass really runs
    on that base (the scalings move, a little); logits stay finite on 4-bit."""
    base_dir, experts = tiny
    cfg = XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True)
    ref = XLoraModel.from_experts(load_base(base_dir)[0], experts, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.classifier.parameters():
            p.normal_(0, 0.5)
    state = ref.classifier.state_dict()
    logits(ref)
    s_ref = ref.get_latest_scalings()
    for quant, bound in (("int8", 0.1), ("nf4", None)):
        model = XLoraModel.from_experts(load_base(base_dir, quantization=quant)[0], experts, cfg)
        model.classifier.load_state_dict(state)
        out = logits(model)
        assert torch.isfinite(out).all()
        if bound is not None:
            assert 0 < (model.get_latest_scalings() - s_ref).abs().mean() < bound


def test_checkpoint_saved_on_one_precision_loads_on_every_other(tiny, tmp_path):
    base_dir, experts = tiny
    model = XLoraModel.from_experts(load_base(base_dir)[0], experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    ck = model.save_pretrained(tmp_path / "ck")
    assert not any("embed" in p.name or "model.safetensors" == p.name for p in ck.rglob("*"))  # no base weights
    saved = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    for dtype, quant in (("bfloat16", None), ("float32", "int8"), ("bfloat16", "nf4"), ("float16", None)):
        loaded = XLoraModel.from_pretrained(load_base(base_dir, dtype=dtype, quantization=quant)[0], ck)
        for k, v in loaded.classifier.state_dict().items():
            assert torch.equal(v, saved[k])  # float32 classifier: bit-identical whatever the base
        assert torch.isfinite(logits(loaded)).all()
        again = loaded.save_pretrained(tmp_path / f"again-{dtype}-{quant}")
        assert json.loads((again / "xlora_config.json").read_text()) == json.loads(
            (ck / "xlora_config.json").read_text()
        )


def mean_loss(model, ds) -> float:
    from xlora.train.data import collate

    batch = collate([ds[i] for i in range(len(ds))], 0)
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_gate_trains_on_a_quantized_frozen_base(train_setup, tmp_path):
    base_dir, experts, data, _ = train_setup
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = load_base(base_dir, quantization="int8")[0]
    torch.manual_seed(0)
    model = XLoraModel.from_experts(base, experts, XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True))
    ds = load_dataset(data, tok)
    before = mean_loss(model, ds)
    args = TrainingArgs(output_dir=str(tmp_path / "g"), max_steps=12, batch_size=8, lr=1e-2, progress=False)
    train_gate(model, ds, None, args, pad_token_id=0)
    assert mean_loss(model, ds) < before - 0.01  # the same examples, before and after
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("classifier"))


def test_expert_trains_qlora_style_on_a_4bit_base(train_setup, tmp_path):
    base_dir, _, data, _ = train_setup
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = load_base(base_dir, quantization="nf4")[0]
    args = TrainingArgs(output_dir=str(tmp_path / "e"), max_steps=8, batch_size=8, lr=1e-2, progress=False)
    records = train_expert(base, load_dataset(data, tok), None, args, LoraOptions(rank=4, targets=["q_proj", "v_proj"]))
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    model = XLoraModel.from_experts(load_base(base_dir)[0], {"q": tmp_path / "e"})  # usable on an fp32 base
    assert model.n_layers == 4


def test_load_base_options_and_report(tiny):
    base_dir, _ = tiny
    assert describe_base(load_base(base_dir)[0]) == {"dtype": "float32", "quantization": "none"}
    assert describe_base(load_base(base_dir, dtype="bfloat16")[0]) == {"dtype": "bfloat16", "quantization": "none"}
    assert describe_base(load_base(base_dir, quantization="nf4")[0])["quantization"] == "nf4"
    assert describe_base(load_base(base_dir, quantization="int8")[0])["quantization"] == "int8"
    with pytest.raises(ValueError, match=r"dtype: expected 'auto' or one of float32, bfloat16, float16, got 'int8'"):
        load_base(base_dir, dtype="int8")
    with pytest.raises(ValueError, match=r"quantization: expected one of int8, nf4, fp4 or None, got 'q4'"):
        load_base(base_dir, quantization="q4")
