"""Hostile tests of the early gate, merged decoding and vision-language bases: each one failed on the
code as first written (see the commit that adds it)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_base, sharpen
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM
from vlm_helpers import IDEFICS3, QWEN2_VL

from xlora import XLoraConfig, XLoraModel
from xlora.core.early_gate import truncated_decoder
from xlora.core.generation import SamplingOptions, iter_generate
from xlora.core.merge import merged_experts

OPTS = SamplingOptions(max_new_tokens=6, eos_token_id=[])
PROMPT = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(4))


def build(tiny, **options) -> XLoraModel:
    """The tiny Llama with its three experts and a sharp layerwise gate."""
    base_dir, experts = tiny
    torch.manual_seed(0)
    cfg = XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True, **options)
    return sharpen(XLoraModel.from_experts(load_base(base_dir), experts, cfg), seed=2)


def tokens(model: XLoraModel, ids: torch.Tensor, **kw) -> torch.Tensor:
    return torch.stack([s.tokens for s in iter_generate(model, ids, None, OPTS, **kw)], 1)


# ---------------------------------------------------------------- early gate: other architectures


def _neox() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=64)
    return GPTNeoXForCausalLM(cfg).eval()


def _opt() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=64)
    return OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [_neox, _opt], ids=["gpt-neox", "opt"])
def test_scaling_pass_norm_false_skips_a_final_layer_norm(make) -> None:
    """GPT-NeoX and OPT call their final norm `final_layer_norm`: norm=False must give layer k's raw
    residual stream there too, not silently the normed one."""
    model = make()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model.base_model(ids, output_hidden_states=True).hidden_states[1]  # after block 1, no norm
        with truncated_decoder(model.base_model, 1, norm=False):
            got = model.base_model(ids).last_hidden_state
    assert torch.allclose(got, raw, atol=1e-6)


def test_early_gate_cuts_the_language_model_of_idefics3_not_its_vision_tower() -> None:
    """Idefics3 keeps its language model under `text_model`; its SigLIP encoder has as many layers
    (2 here), and the early gate must cut the language model, never the vision tower."""
    for family in (IDEFICS3, QWEN2_VL):
        torch.manual_seed(0)
        model = family.cls(family.config())
        text = model.get_decoder()
        n_text = len(text.layers)
        before = {n: len(m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)}
        with truncated_decoder(model.base_model, 1):
            assert len(text.layers) == 1, family.name
            after = {n: len(m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)}
        changed = {n for n in before if before[n] != after.get(n)}
        assert all("vision" not in n and "visual" not in n for n in changed), (family.name, changed)
        assert len(text.layers) == n_text


# ---------------------------------------------------------------- merged decoding


def test_merged_top_k_on_bf16_picks_the_expert_the_fused_path_picks(tiny) -> None:
    """Top-k must be chosen on the scalings as given (float32 from the classifier), not after a cast
    to a bf16 base's dtype, where 0.4999 and 0.5001 tie and the other expert may win."""
    base_dir, experts = tiny
    base = load_base(base_dir).to(torch.bfloat16)
    model = XLoraModel.from_experts(base, experts, XLoraConfig(top_k_lora=1))
    s = torch.zeros(model.n_layers, model.n_experts)
    s[:, 0], s[:, 1] = 0.4999, 0.5001
    x = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with model.apply_scalings(s[None, None].expand(1, 5, -1, -1)):
            fused = model.base(input_ids=x).logits.float()
        with merged_experts(model, s):
            merged = model.base(input_ids=x).logits.float()
    assert torch.allclose(merged, fused, atol=0.05), (merged - fused).abs().max()


def test_generation_with_experts_disabled_is_refused_while_another_holds_the_merge(tiny) -> None:
    """A suspended merged generator leaves expert deltas in the base weights: a generation with
    `disable_experts()` would silently decode with them; it must refuse like every other call."""
    model = build(tiny)
    suspended = iter_generate(model, PROMPT, None, OPTS, reuse_scalings_after=1)
    for _ in range(4):
        next(suspended)
    assert model._merged
    with model.disable_experts(), pytest.raises(RuntimeError, match="merged"):
        tokens(model, PROMPT)
    suspended.close()
    with model.disable_experts():
        plain = tokens(model, PROMPT)
        assert torch.equal(plain, tokens(model, PROMPT))


def test_unload_is_refused_while_a_generation_holds_the_merge(tiny) -> None:
    """`unload()` returns "the plain base model": with a merged generator suspended it would hand
    out weights that include the experts."""
    model = build(tiny)
    before = {k: v.clone() for k, v in model.base.state_dict().items() if "lora" not in k}
    suspended = iter_generate(model, PROMPT, None, OPTS, reuse_scalings_after=1)
    for _ in range(4):
        next(suspended)
    with pytest.raises(RuntimeError, match="merged"):
        model.unload()
    suspended.close()
    base = model.unload()
    after = base.state_dict()
    assert all(torch.equal(v, after[k.replace(".base_layer", "")]) for k, v in before.items())


def test_a_weight_shared_by_two_adapted_layers_is_not_merged_and_comes_back_exactly(tiny) -> None:
    """Two adapted linears on one weight tensor (block sharing, as in Zamba-style models): merging
    would add both layers' deltas to both, and restoring in forward order left the first merge in."""
    base_dir, experts = tiny
    base = load_base(base_dir)
    layers = base.model.layers
    layers[1].self_attn.q_proj.weight = layers[0].self_attn.q_proj.weight
    original = layers[0].self_attn.q_proj.weight.detach().clone()
    model = sharpen(XLoraModel.from_experts(base, experts, XLoraConfig(layerwise_scalings=True)), seed=2)
    s = torch.rand(model.n_layers, model.n_experts, generator=torch.Generator().manual_seed(0))
    x = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with model.apply_scalings(s[None, None].expand(1, 5, -1, -1)):
            fused = model.base(input_ids=x).logits
        with merged_experts(model, s):
            merged = model.base(input_ids=x).logits
    assert torch.allclose(merged, fused, atol=1e-5)
    assert torch.equal(layers[0].self_attn.q_proj.base_layer.weight, original)


def test_images_given_to_a_text_only_base_are_refused(tiny) -> None:
    """A plain causal LM ignores `pixel_values` (its forward swallows **kwargs): the answer would be
    produced without the image the caller believes it saw."""
    model = build(tiny)
    with pytest.raises(ValueError, match="pixel_values.*text-only"):
        model.generate(PROMPT, max_new_tokens=2, pixel_values=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="pixel_values.*text-only"):
        next(iter_generate(model, PROMPT, None, OPTS, images={"pixel_values": torch.randn(1, 3, 8, 8)}))


def test_gate_setters_are_refused_while_a_generation_holds_the_merge(tiny) -> None:
    """The fused path re-reads top_k / global_scaling_weight every step; merged weights were built
    with the old values. Changing them mid-generation must be refused, not half-applied."""
    model = build(tiny)
    suspended = iter_generate(model, PROMPT, None, OPTS, reuse_scalings_after=1)
    for _ in range(4):
        next(suspended)
    with pytest.raises(RuntimeError, match="merged"):
        model.set_global_scaling_weight(0.5)
    with pytest.raises(RuntimeError, match="merged"):
        model.set_topk_lora(1)
    assert model.config.global_scaling_weight == 1.0 and model.config.top_k_lora is None
    suspended.close()
    model.set_topk_lora(1)
