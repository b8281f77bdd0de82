"""X-LoRA on vision-language bases (Qwen2-VL with mrope, Idefics3 = SmolVLM): images reach both
passes, generation with two caches equals recomputation and transformers' own `generate`, PEFT's
XLoraModel is the oracle for the logits, and vision-tower targets are refused."""

from __future__ import annotations

import pytest
import torch
from peft import XLoraConfig as PeftXLoraConfig
from peft import get_peft_model
from vlm_helpers import FAMILIES, IMAGE, make_vlm_adapter, make_vlm_experts

from xlora import XLoraConfig, XLoraModel
from xlora.core.experts import ExpertError
from xlora.core.generation import SamplingOptions, iter_generate
from xlora.core.layers import XLoraLinear

OPTIONS = dict(xlora_depth=2, xlora_size=32, layerwise_scalings=True, softmax_temperature=0.5)


@pytest.fixture(scope="module", params=list(FAMILIES))
def vlm(request, tmp_path_factory):
    """(family, base dir, experts) for each VLM family, built once per module."""
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(family.name)
    base_dir = family.save(root / "base")
    return family, base_dir, make_vlm_experts(family, root, base_dir)


def sharpen(model: XLoraModel, seed: int = 0) -> XLoraModel:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0.0, 0.6)
    return model


def build(vlm, **options) -> XLoraModel:
    family, base_dir, experts = vlm
    return sharpen(XLoraModel.from_experts(family.load(base_dir), experts, XLoraConfig(**{**OPTIONS, **options})))


def inputs(family, pad=(2, 0), seed=5):
    ids, mask = family.prompt(list(pad))
    return ids, mask, family.images(len(pad), seed)


# ---------------------------------------------------------------- forward: PEFT is the oracle


TOPK = dict(top_k_lora=1, enable_softmax_topk=True)  # PEFT fixed X-LoRA top-k on Qwen2-VL in its PR #2793


@pytest.mark.parametrize(
    ("with_images", "extra"), [(True, {}), (False, {}), (True, TOPK)], ids=["images", "text-only", "images-topk"]
)
def test_logits_equal_peft(vlm, with_images, extra):
    """PEFT runs the whole model (vision tower included) in both passes; ours must give its logits."""
    family, base_dir, experts = vlm
    ours = build(vlm, **extra)
    peft_cfg = PeftXLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=64,
        adapters={str(i): str(p) for i, p in enumerate(experts.values())},
        **OPTIONS,
        **extra,
    )
    peft_base = family.load(base_dir)
    peft_base.config.use_cache = False  # PEFT's X-LoRA refuses a config with use_cache=True (Idefics3's default)
    peft_model = get_peft_model(peft_base, peft_cfg).eval()
    peft_model.base_model.internal_xlora_classifier.load_state_dict(ours.classifier.state_dict())
    ids, mask, images = inputs(family)
    if not with_images:
        ids = torch.where(ids >= IMAGE, torch.full_like(ids, 9), ids)  # same length, plain text
        images = {}
    elif family.name == "qwen2-vl":  # what its processor returns; PEFT does not derive it
        images["mm_token_type_ids"] = (ids == IMAGE).int()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, **images).logits
        got = ours(input_ids=ids, attention_mask=mask, **images).logits
        with ours.disable_experts():
            plain = ours(input_ids=ids, attention_mask=mask, **images).logits
    assert (expected - plain).abs().max() > 1e-2, "the experts must matter for the comparison to mean anything"
    # fp32 on both sides, same ops except our fused expert GEMMs (PEFT: one pair per expert): the
    # difference is summation order, a few ulp per layer; 1e-5 as in test_oracle_peft
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ours.get_latest_scalings(), peft_model.base_model.get_latest_scalings(), atol=1e-5, rtol=1e-5
    )


def test_images_reach_both_passes(vlm):
    """Another image changes the scalings (only the scaling pass makes them) and the logits of the
    text after the image; text before the image is unaffected (causal)."""
    family, _, _ = vlm
    model = build(vlm)
    ids, mask, first = inputs(family)
    second = family.images(2, seed=99)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, **first).logits
        s_a = model.get_latest_scalings()
        b = model(input_ids=ids, attention_mask=mask, **second).logits
        s_b = model.get_latest_scalings()
    after = slice(-4, None)  # the 4 text tokens after the image
    before = slice(-4 - family.tokens_per_image - 2 - 3, -4 - family.tokens_per_image - 2)
    assert (s_a[:, after] - s_b[:, after]).abs().max() > 1e-3
    assert (a[:, after] - b[:, after]).abs().max() > 1e-3
    torch.testing.assert_close(s_a[:, before], s_b[:, before])
    torch.testing.assert_close(a[:, before], b[:, before])
    # the classifier read every position of the merged sequence, image tokens included
    assert s_a.shape[:2] == ids.shape


def test_labels_loss_with_images(vlm):
    family, _, _ = vlm
    model = build(vlm)
    ids, mask, images = inputs(family)
    labels = ids.masked_fill((mask == 0) | (ids >= IMAGE), -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **images)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # only the classifier learns
    assert model.classifier.layers[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- generation


def test_generate_cached_equals_uncached(vlm):
    """Two KV caches and images in the prefill == recomputing both passes over everything each step
    (left padding: Qwen2-VL's 3-D positions per row, rope deltas per row)."""
    family, _, _ = vlm
    model = build(vlm)
    ids, mask, images = inputs(family, pad=(3, 0, 1))
    kw = dict(max_new_tokens=6, eos_token_id=[], **images)
    cached = model.generate(ids, mask, **kw)
    uncached = model.generate(ids, mask, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert not bool((cached[:, ids.shape[1] :] >= IMAGE).any())


def test_generate_equals_stepwise_forward(vlm):
    """Reference independent of generation.py: greedy argmax of a full forward per step, positions
    left to the model (Qwen2-VL computes its mrope positions itself)."""
    family, _, _ = vlm
    model = build(vlm)
    ids, mask, images = inputs(family, pad=(0, 0))
    got = model.generate(ids, mask, max_new_tokens=5, eos_token_id=[], **images)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            extra = dict(images)
            if family.name == "qwen2-vl":
                extra["mm_token_type_ids"] = torch.nn.functional.pad(
                    (ids == IMAGE).int(), (0, seq.shape[1] - ids.shape[1])
                )
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), **extra).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


def test_static_scalings_generate_equals_transformers(vlm):
    """With the scalings held fixed our loop must equal transformers' own `generate` on the base
    (its own mrope positions, rope deltas and cache handling)."""
    family, _, _ = vlm
    model = build(vlm)
    ids, mask, images = inputs(family, pad=(2, 0))
    weights = torch.tensor([0.7, 0.3])
    with model.static_scalings(weights):
        ours = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[], **images)
        extra = {"mm_token_type_ids": (ids == IMAGE).int()} if family.name == "qwen2-vl" else {}
        with torch.no_grad(), model.apply_scalings(weights.expand(model.n_layers, 2)[None, None]):
            theirs = model.base.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **images, **extra
            )
    assert torch.equal(ours, theirs)


def test_both_passes_get_the_same_positions(vlm):
    """Every language-model call of the scaling pass is followed by the real pass with equal
    positions; on Qwen2-VL they are 3-D and continue past the image as the model's rope delta says."""
    family, _, _ = vlm
    model = build(vlm)
    ids, mask, images = inputs(family, pad=(2, 0))
    seen = []
    lm = model.base.get_decoder()
    handle = lm.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        model.generate(ids, mask, max_new_tokens=3, eos_token_id=[], **images)
    finally:
        handle.remove()
    assert len(seen) == 6  # scaling pass + real pass for the prefill and 2 decode steps
    for scaling_pos, real_pos in zip(seen[::2], seen[1::2]):
        assert torch.equal(scaling_pos, real_pos)
    if family.name == "qwen2-vl":
        expected, delta = model.base.model.get_rope_index(
            ids, (ids == IMAGE).int(), images["image_grid_thw"], attention_mask=mask
        )
        assert seen[0].shape == (3, *ids.shape) and torch.equal(seen[0], expected)
        assert int(delta.abs().sum()) > 0  # the image compresses positions: a real test of the delta
        n_real = mask.sum(1, keepdim=True)  # the first generated token's text position per row
        assert torch.equal(seen[2], (n_real + delta)[None].expand(3, -1, -1))


def test_generate_rows_finish_early_with_images(vlm):
    """A row that stops early leaves the batch; in the uncached path its image leaves with it
    (Qwen2-VL's flat patches are selected per image)."""
    family, _, _ = vlm
    model = build(vlm)
    ids, mask, images = inputs(family, pad=(1, 0, 2))
    free = model.generate(ids, mask, max_new_tokens=4, eos_token_id=[], **images)
    eos = int(free[1, ids.shape[1]])  # row 1 stops at once
    kw = dict(max_new_tokens=4, eos_token_id=eos, pad_token_id=0, **images)
    cached, uncached = model.generate(ids, mask, **kw), model.generate(ids, mask, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert int(cached[1, ids.shape[1]]) == eos and bool((cached[1, ids.shape[1] + 1 :] == 0).all())


def test_text_only_prompts_on_a_vlm(vlm):
    family, _, _ = vlm
    model = build(vlm)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    cached = model.generate(ids, mask, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(cached, model.generate(ids, mask, max_new_tokens=5, eos_token_id=[], use_cache=False))


def test_generate_refuses_unknown_keywords(vlm):
    model = build(vlm)
    with pytest.raises(TypeError, match="max_tokens"):
        model.generate(torch.tensor([[5, 6]]), max_tokens=3)
    family = vlm[0]
    ids, mask, images = inputs(family)
    images["pixel_valuez"] = images.pop("pixel_values")  # a typo the model's **kwargs would swallow
    for call in (lambda: model.generate(ids, mask, max_new_tokens=2, **images), lambda: model(input_ids=ids, **images)):
        with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['pixel_valuez'\]"):
            call()


def _mismatched(family, ids, images):
    """Image inputs that do not fit the prompt, each with the start of the error it must give."""
    cases = [({}, "input_ids hold 8 image placeholder token\\(s\\) but no pixel_values were given")]
    nan = {**images, "pixel_values": images["pixel_values"].clone()}
    nan["pixel_values"].view(-1)[3] = float("nan")
    cases.append((nan, "pixel_values: holds NaN or inf values"))
    if family.name == "qwen2-vl":  # flat patches with one grid row per image
        one_grid = {**images, "image_grid_thw": images["image_grid_thw"][:1]}
        cases.append((one_grid, "pixel_values: 32 patch rows, but image_grid_thw describes 16 for 1 image"))
        three = {
            "pixel_values": torch.randn(48, images["pixel_values"].shape[1]),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * 3),
        }
        cases.append((three, "input_ids hold 2 image placeholder run\\(s\\) but image_grid_thw describes 3"))
    else:  # [B, I, C, H, W] with a fixed number of placeholders per image
        extra = {**images, "pixel_values": images["pixel_values"].repeat(1, 2, 1, 1, 1)}
        extra["pixel_attention_mask"] = images["pixel_attention_mask"].repeat(1, 2, 1, 1)
        cases.append((extra, "input_ids hold 8 image placeholder tokens; 4 image\\(s\\) need 16"))
        cases.append(
            ({**images, "pixel_values": images["pixel_values"][:1]}, "pixel_values: 1 rows of images for a batch of 2")
        )
    return cases


def test_image_inputs_that_do_not_fit_the_prompt_are_refused(vlm):
    """Placeholders without pixels, NaN pixels, more images than placeholder runs: one clear line,
    from `generate` and from `forward`, never an answer without the image or a raw shape error."""
    family = vlm[0]
    model = build(vlm)
    ids, mask, images = inputs(family)
    for bad, message in _mismatched(family, ids, images):
        with pytest.raises(ValueError, match=message):
            model.generate(ids, mask, max_new_tokens=2, **bad)
        with pytest.raises(ValueError, match=message):
            model(input_ids=ids, attention_mask=mask, **bad)
    text = torch.where(ids >= IMAGE, torch.full_like(ids, 9), ids)
    with pytest.raises(ValueError, match="pixel_values given but input_ids hold no image placeholder token"):
        model.generate(text, mask, max_new_tokens=2, **images)
    model.generate(ids, mask, max_new_tokens=2, **images)  # the matching inputs still run


# ---------------------------------------------------------------- what is adapted


def test_only_the_language_model_is_adapted(vlm):
    family, _, _ = vlm
    model = build(vlm)
    prefix = "model.language_model." if family.name == "qwen2-vl" else "model.text_model."
    assert model.n_layers == 2 * 6 and all(name.startswith(prefix) for name in model.module_names)


def test_vision_tower_targets_are_refused(vlm, tmp_path):
    """PEFT's plain `target_modules=["q_proj", "v_proj"]` also adapts SigLIP's q_proj/v_proj in
    Idefics3: such an expert is refused (naming the modules), and the base is left untouched. On
    Qwen2-VL the vision tower's linears are `qkv`/`proj`/`fc1`: an expert on `qkv` is refused too."""
    family, base_dir, experts = vlm
    targets = ["q_proj", "v_proj"] if family.name == "idefics3" else ["q_proj", "qkv"]
    wide = make_vlm_adapter(family, base_dir, tmp_path / "wide", targets, r=2, alpha=4, seed=5)
    base = family.load(base_dir)
    tower = "model.vision_model.encoder" if family.name == "idefics3" else "model.visual.blocks"
    with pytest.raises(ExpertError, match=rf"'wide' adapts \d+ module\(s\) outside the language model.*{tower}"):
        XLoraModel.from_experts(base, {**experts, "wide": wide})
    assert not any(isinstance(m, XLoraLinear) for m in base.modules())


def test_early_gate_and_merged_decoding_on_a_vlm(vlm):
    """The early gate cuts the language model's blocks (image tokens included) and merged decoding
    folds the experts into its weights: cached == uncached, merged == fused tokens."""
    family, _, _ = vlm
    model = build(vlm, scaling_pass_layers=1)
    ids, mask, images = inputs(family, pad=(2, 0))
    kw = dict(max_new_tokens=6, eos_token_id=[], **images)
    cached = model.generate(ids, mask, **kw)
    assert torch.equal(cached, model.generate(ids, mask, use_cache=False, **kw))
    weights = [0.7] + [0.3 / (model.n_experts - 1)] * (model.n_experts - 1)
    with model.static_scalings(weights):
        merged = model.generate(ids, mask, **kw)
        opts = SamplingOptions(max_new_tokens=6, eos_token_id=[])
        fused = torch.stack([s.tokens for s in iter_generate(model, ids, mask, opts, merge=False, images=images)], 1)
    assert torch.equal(merged[:, ids.shape[1] :], fused)
