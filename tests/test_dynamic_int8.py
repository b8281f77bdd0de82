"""X-LoRA over a PyTorch dynamic-int8 base (`quantization="dynamic-int8"`, CPU inference only).

Oracles: the int8 base's own logits (experts disabled), an independent forward-hook implementation
of the LoRA sums on the same int8 base, and our own cached decoding against step-by-step forwards."""

from __future__ import annotations

import pytest
import torch
from helpers import add_tiny_tokenizer, load_base

from xlora import XLoraConfig, XLoraModel
from xlora.base_models import describe_base
from xlora.base_models import load_base as load_any_base
from xlora.generation import SamplingOptions, iter_generate


@pytest.fixture(scope="module")
def int8(tiny):
    base_dir, experts = tiny
    add_tiny_tokenizer(base_dir)
    base, _ = load_any_base(str(base_dir), quantization="dynamic-int8")
    return base_dir, experts, base


def read_adapter(path):
    """{module: (A, B, scale)} straight from PEFT's files (alpha/r, or alpha/sqrt(r) for rsLoRA)."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            r = a.shape[0]
            out[module] = (a.float(), b.float(), cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r))
    return out


def hook_experts(base, experts, scalings):
    """Forward hooks adding `sum_i s_i (alpha_i/r_i) B_i A_i x` to each adapted module of `base`
    (no xlora code); `scalings` `[B, T, L, N]` or broadcastable. Returns the hook handles."""
    loaded = [read_adapter(path) for path in experts.values()]
    order = list(dict(base.named_modules()))
    modules = sorted({m for e in loaded for m in e}, key=order.index)  # X-LoRA's layer order
    handles = []
    for layer, name in enumerate(modules):

        def hook(mod, args, out, layer=layer, name=name):
            x = args[0]
            for i, e in enumerate(loaded):
                if name in e:
                    a, b, scale = e[name]
                    out = out + scalings[..., layer, i : i + 1] * scale * (x @ a.T @ b.T)
            return out

        handles.append(base.get_submodule(name).register_forward_hook(hook))
    return handles


def hooked_logits(base, experts, scalings, ids):
    """Logits of `base` with the experts added by `hook_experts`."""
    handles = hook_experts(base, experts, scalings)
    try:
        with torch.no_grad():
            return base(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def test_layers_are_int8_and_reported(int8):
    _, _, base = int8
    q = base.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q).__module__.startswith("torch.ao.nn.quantized.dynamic") and q.weight().dtype == torch.qint8
    assert describe_base(base) == {"dtype": "float32", "quantization": "dynamic-int8"}


def test_logits_equal_the_hooked_int8_oracle(int8):
    base_dir, experts, _ = int8
    base, _ = load_any_base(str(base_dir), quantization="dynamic-int8")
    oracle_base, _ = load_any_base(str(base_dir), quantization="dynamic-int8")
    model = XLoraModel.from_experts(base, experts, XLoraConfig(xlora_depth=2, xlora_size=8, layerwise_scalings=True))
    ids = torch.tensor([[5, 9, 17, 33, 2, 64, 7]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        scalings = model.get_latest_scalings()  # [1, T, L, N]
        with model.disable_experts():
            plain = model(input_ids=ids).logits
        assert torch.equal(plain, oracle_base(input_ids=ids).logits)
    expected = hooked_logits(oracle_base, experts, scalings, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the experts do act


def test_cached_generation_equals_transformers_on_the_hooked_base_and_merge_is_skipped(int8):
    """Dynamic int8 quantizes each call's activations with one scale per tensor, so a KV-cached step
    and a full recompute differ slightly (for the plain base too). The oracle is therefore the same
    schedule: transformers' own cached `generate` on the int8 base with the LoRA sums hooked in."""
    base_dir, experts, _ = int8
    base, _ = load_any_base(str(base_dir), quantization="dynamic-int8")
    oracle_base, _ = load_any_base(str(base_dir), quantization="dynamic-int8")
    model = XLoraModel.from_experts(base, experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    ids = torch.tensor([[5, 9, 17, 33]])
    weights = torch.tensor([0.5, 1.0, 0.3])
    with model.static_scalings(weights):
        got = model.generate(ids, max_new_tokens=8, eos_token_id=[])
        opts = SamplingOptions(max_new_tokens=8, eos_token_id=[])
        merged = torch.stack([s.tokens for s in iter_generate(model, ids, None, opts, merge=True)])
    scalings = weights.expand(1, 1, model.n_layers, 3)  # [1, 1, L, N]
    handles = hook_experts(oracle_base, experts, scalings)
    try:
        expected = oracle_base.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(got, expected)
    assert torch.equal(merged[:, 0], expected[0, 4:])  # quantized layers keep the fused path


def test_refused_where_it_cannot_work(int8, tmp_path):
    from xlora.train import train_gate
    from xlora.training import TrainingArgs

    base_dir, experts, _ = int8
    base, _ = load_any_base(str(base_dir), quantization="dynamic-int8")
    model = XLoraModel.from_experts(base, experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    with pytest.raises(ValueError, match="training on a 'dynamic-int8' base is not possible"):
        train_gate(model, None, None, TrainingArgs(output_dir=str(tmp_path / "gate")))
    assert not (tmp_path / "gate").exists()
    with pytest.raises(ValueError, match=r"needs a float32 model on the CPU \(got torch.bfloat16"):
        load_any_base(str(base_dir), dtype="bfloat16", quantization="dynamic-int8")
    with pytest.raises(ValueError, match="expected one of int8, nf4, fp4, dynamic-int8 or None, got 'int4'"):
        load_any_base(str(base_dir), quantization="int4")


def test_unchanged_float_path_still_matches(int8):
    """The helper that reads weights must leave ordinary float layers exactly as before."""
    base_dir, experts, _ = int8
    a = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        got = a(input_ids=ids).logits
    torch.testing.assert_close(got, hooked_logits(load_base(base_dir), experts, a.get_latest_scalings(), ids))
