"""Merged decoding: fixed, shared scalings folded into the base weights give the unmerged tokens, run
no expert math, and leave every weight exactly as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import add_tiny_tokenizer, load_base, make_adapter, sharpen

from xlora import XLoraConfig, XLoraModel
from xlora.core.generation import SamplingOptions, iter_generate
from xlora.core.layers import XLoraLinear

OPTS = SamplingOptions(max_new_tokens=12, eos_token_id=[])
PROMPT = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4))


def build(tiny, value=None):
    base_dir, experts = tiny
    torch.manual_seed(0)
    cfg = XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True, scaling_pass_value=value)
    return sharpen(XLoraModel.from_experts(load_base(base_dir), experts, cfg), seed=2)


def tokens(model, ids, mask=None, **kw):
    steps = list(iter_generate(model, ids, mask, OPTS, **kw))
    scalings = [s.scalings for s in steps if s.scalings is not None]
    return torch.stack([s.tokens for s in steps], 1), torch.stack(scalings, 1) if scalings else None


def snapshot(model):
    return {k: v.clone() for k, v in model.base.state_dict().items()}


def count_expert_math(monkeypatch):
    calls = []
    original = XLoraLinear._delta
    monkeypatch.setattr(XLoraLinear, "_delta", lambda self, x, c: calls.append(1) or original(self, x, c))
    return calls


def test_reuse_with_merge_gives_the_unmerged_tokens_and_runs_no_expert_math(tiny, monkeypatch):
    model = build(tiny)
    before = snapshot(model)
    plain_tokens, plain_scalings = tokens(model, PROMPT, reuse_scalings_after=3, merge=False)
    calls = count_expert_math(monkeypatch)
    merged_tokens, merged_scalings = tokens(model, PROMPT, reuse_scalings_after=3)
    assert torch.equal(merged_tokens, plain_tokens)
    assert torch.equal(merged_scalings, plain_scalings)
    # steps 0..3 route: both passes run the experts (scaling pass value 1/N); the 8 later steps are the base
    n_layers = model.n_layers
    assert len(calls) == 4 * 2 * n_layers
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored exactly, not by subtraction
    # and without reuse the experts really do change the tokens (the comparison above can fail)
    with model.disable_experts():
        base_tokens, _ = tokens(model, PROMPT)
    assert not torch.equal(base_tokens, plain_tokens)


def test_static_mix_merges_from_the_prompt_for_a_whole_batch(tiny, padded_batch, monkeypatch):
    ids, mask = padded_batch
    model = build(tiny)
    with model.static_scalings([0.5, 0.2, 0.3]):
        plain, _ = tokens(model, ids, mask, merge=False)
        calls = count_expert_math(monkeypatch)
        merged, _ = tokens(model, ids, mask)
    assert torch.equal(plain, merged)
    assert calls == []


def test_rows_with_different_scalings_keep_the_fused_path(tiny, padded_batch, monkeypatch):
    ids, mask = padded_batch
    model = build(tiny)
    seen = []
    for _ in iter_generate(model, ids, mask, OPTS, reuse_scalings_after=2):
        seen.append(model._merged)
    assert seen and not any(seen)


def test_a_generator_stopped_early_holds_the_model_until_closed(tiny):
    model = build(tiny)
    before = snapshot(model)
    steps = iter_generate(model, PROMPT, None, OPTS, reuse_scalings_after=1)
    for n, _ in enumerate(steps):
        if n == 4:
            break
    assert model._merged
    with pytest.raises(RuntimeError, match="close\\(\\) its iter_generate generator"):
        model(input_ids=PROMPT)
    steps.close()
    after = snapshot(model)
    assert not model._merged and all(torch.equal(before[k], after[k]) for k in before)
    model(input_ids=PROMPT)  # usable again


def test_tied_lm_head_adapted_is_not_merged_and_the_embedding_is_untouched(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    add_tiny_tokenizer(tmp_path / "tied")
    experts = {
        "h": make_adapter(tmp_path / "tied", tmp_path / "h", 4, 8, ["q_proj", "lm_head"], seed=5),
        "v": make_adapter(tmp_path / "tied", tmp_path / "v", 2, 4, ["v_proj"], seed=6),
    }
    model = sharpen(XLoraModel.from_experts(load_base(tmp_path / "tied"), experts, XLoraConfig()), seed=1)
    emb = model.base.get_input_embeddings().weight
    assert model.base.lm_head.base_layer.weight.data_ptr() == emb.data_ptr()
    emb_before = emb.clone()
    plain, _ = tokens(model, PROMPT, reuse_scalings_after=2, merge=False)
    calls = count_expert_math(monkeypatch)
    merged, _ = tokens(model, PROMPT, reuse_scalings_after=2)
    assert torch.equal(plain, merged)
    assert torch.equal(emb, emb_before)
    assert len(calls) == 3 * model.n_layers + 9 * 1  # after the merge only the tied lm_head runs its experts


def test_quantized_base_is_never_merged(tiny, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from xlora.bases.loading import load_base as load_quantized

    base_dir, experts = tiny
    add_tiny_tokenizer(base_dir)
    base = load_quantized(base_dir, quantization="int8")[0]
    torch.manual_seed(0)
    model = sharpen(XLoraModel.from_experts(base, experts, XLoraConfig(xlora_depth=2, xlora_size=16)), seed=2)
    plain, _ = tokens(model, PROMPT, reuse_scalings_after=2, merge=False)
    calls = count_expert_math(monkeypatch)
    merged, _ = tokens(model, PROMPT, reuse_scalings_after=2)
    assert torch.equal(plain, merged)
    assert len(calls) == OPTS.max_new_tokens * model.n_layers  # every step keeps the fused path


def test_a_callback_that_raises_leaves_the_weights_unmerged(tiny):
    """`generate` closes its generator in `finally`: the raised exception (kept alive by a notebook)
    must not keep the experts merged into the base weights."""
    model = build(tiny)
    before = snapshot(model)

    def boom(step):
        if model._merged:
            raise KeyError("callback failed")

    with pytest.raises(KeyError) as caught:
        model.generate(PROMPT, max_new_tokens=8, reuse_scalings_after=1, callback=boom)
    assert caught.value is not None  # the exception, and its traceback's frames, are still alive here
    after = snapshot(model)
    assert not model._merged and all(torch.equal(before[k], after[k]) for k in before)
    model(input_ids=PROMPT)  # usable again
