"""X-LoRA on vision-language bases: what is adapted, which inputs reach both passes, positions.

A vision-language model (VLM) such as Qwen2-VL or Idefics3 (SmolVLM) is a vision tower, a
projector and a causal language model. The image becomes a run of placeholder tokens in
`input_ids` whose embeddings the model replaces by the projected image features, so the language
model sees one merged sequence of T tokens (text and image) and X-LoRA works on it unchanged:

    input_ids + pixel_values ──> vision tower ──> projector ──┐ (run in BOTH passes)
                                                             v
    scaling pass: language model over the merged sequence ──> last hidden state [B, T, H]
                                                             │ classifier
                                                             v
    real pass: language model with scalings [B, T, L, N] (image tokens get theirs too) ──> logits

Decisions (README, "Vision-language bases"):

- **Only the language model (and the LM head) is adapted.** The experts are LoRA adapters on the
  language model's linears. A vision-tower or projector linear works on image patches, not on
  the T tokens the scalings index, so it can never be an X-LoRA layer: an expert that carries
  tensors for such a module (PEFT's `target_modules=["q_proj", "v_proj"]` also matches SigLIP's
  `q_proj`/`v_proj` in Idefics3) is refused with an error naming the modules, never silently
  mixed or dropped. Train experts with a language-model-only target (e.g. the regex
  `r".*language_model.*\\.(q_proj|v_proj)"` for Qwen2-VL, `text_model` for Idefics3).
- **Image inputs reach both passes.** Every keyword named `pixel_*`, `image_*`, `video_*` or
  `mm_*` (plus `second_per_grid_ts`) goes to the scaling pass and to the real pass, so the
  classifier reads hidden states that saw the image. The vision tower runs once per pass (it is
  not adapted, so both runs give the same features).
- **Positions come from the model.** Qwen2-VL's multimodal RoPE (3-D positions for image tokens)
  is computed by the model's own `get_rope_index` over the prompt; generated tokens continue with
  the text position plus the model's rope delta, and both passes get the same tensor. Bases
  without `get_rope_index` (Idefics3, plain LMs) keep 1-D positions from the attention mask.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

_SHARED_PREFIXES = ("pixel_", "image_", "video_", "mm_")
_SHARED_NAMES = frozenset({"second_per_grid_ts"})


def text_config(base: nn.Module) -> Any:
    """The language model's config: the base's own for a plain LM, `text_config` for a VLM."""
    config = base.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def language_model_name(base: nn.Module) -> str | None:
    """Dotted name of the language model inside a VLM (`model.language_model`, `model.text_model`),
    or None when `base` is a plain causal LM (its decoder is its whole base model)."""
    get_decoder = getattr(base, "get_decoder", None)
    if get_decoder is None:
        return None
    try:
        decoder = get_decoder()
    except Exception:  # noqa: BLE001 - transformers raises for exotic models: treat them as plain LMs
        return None
    if decoder is None or decoder is base or decoder is getattr(base, "base_model", None):
        return None
    return next((name for name, module in base.named_modules() if module is decoder), None)


def modules_outside_language_model(base: nn.Module, modules: list[str]) -> list[str]:
    """The names in `modules` that a VLM's scalings cannot index: not inside its language model and
    not its output embedding (LM head). Empty for a plain causal LM."""
    prefix = language_model_name(base)
    if prefix is None:
        return []
    head = base.get_output_embeddings()
    head_name = next((n for n, m in base.named_modules() if m is head), None) if head is not None else None
    return [m for m in modules if not m.startswith(prefix + ".") and m != head_name]


def outside_error_message(base: nn.Module, expert: str, outside: list[str]) -> str:
    """Why an expert that adapts vision-tower / projector modules is refused, and what to do."""
    prefix = language_model_name(base)
    shown = ", ".join(outside[:4]) + (f" and {len(outside) - 4} more" if len(outside) > 4 else "")
    return (
        f"expert {expert!r} adapts {len(outside)} module(s) outside the language model of this "
        f"vision-language base ({shown}); X-LoRA mixes experts per token of the language model "
        f"({prefix}), and vision-tower / projector layers see image patches, not those tokens. "
        f"Train the expert with target_modules restricted to the language model, e.g. the regex "
        f"r'.*{prefix.rsplit('.', 1)[-1] if prefix else 'language_model'}.*\\.(q_proj|v_proj)'"
    )


def shared_inputs(base: nn.Module, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords of `kwargs` that both passes need (images, grids, modality types), with
    `mm_token_type_ids` derived from `input_ids` when a Qwen2-VL-style base needs it and it is
    missing (0 text, 1 image placeholder, 2 video placeholder; what its processor returns)."""
    shared = {
        k: v for k, v in kwargs.items() if v is not None and (k.startswith(_SHARED_PREFIXES) or k in _SHARED_NAMES)
    }
    grids = shared.get("image_grid_thw") is not None or shared.get("video_grid_thw") is not None
    if grids and "mm_token_type_ids" not in shared and input_ids is not None:
        shared["mm_token_type_ids"] = token_types(base, input_ids)
    return shared


def check_image_keywords(names: Any) -> None:
    """`generate(**images)` takes image inputs only: any other unknown keyword (a typo such as
    `max_tokens=`) is a TypeError, as in a plain function call, not silently ignored."""
    wrong = [n for n in names if not (n.startswith(_SHARED_PREFIXES) or n in _SHARED_NAMES)]
    if wrong:
        raise TypeError(
            f"generate() got unexpected keyword argument(s) {wrong}; besides its options it takes image "
            "inputs only (names starting with pixel_, image_, video_ or mm_)"
        )


def check_vision_base(base: nn.Module, shared: dict[str, Any]) -> None:
    """Image inputs on a text-only base would be dropped silently (its forward swallows keywords):
    refuse them with an error naming the inputs."""
    if shared and language_model_name(base) is None:
        raise ValueError(
            f"generate: {', '.join(sorted(shared))}: {type(base).__name__} is a text-only base model; "
            "image inputs need a vision-language base (Qwen2-VL, Idefics3)"
        )


def token_types(base: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """`[B, T]` int: 1 where `input_ids` is the image placeholder, 2 the video one, else 0."""
    types = torch.zeros_like(input_ids, dtype=torch.int)
    for value, name in ((1, "image_token_id"), (2, "video_token_id")):
        token = getattr(base.config, name, None)
        if token is not None:
            types[input_ids == token] = value
    return types


def for_longer_sequence(shared: dict[str, Any], length: int) -> dict[str, Any]:
    """`shared` for the prompt plus generated tokens (all text): `mm_token_type_ids` padded with 0."""
    types = shared.get("mm_token_type_ids")
    if types is None or types.shape[1] >= length:
        return shared
    pad = types.new_zeros(types.shape[0], length - types.shape[1])
    return {**shared, "mm_token_type_ids": torch.cat([types, pad], dim=1)}


def text_positions(mask: torch.Tensor) -> torch.Tensor:
    """1-D position ids `[B, T]` from an attention mask, as `generate` derives them (padding -> 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_positions(
    base: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, shared: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids of a whole prompt and the rope delta of the tokens that follow it.

    With images or videos on a base that has `get_rope_index` (Qwen2-VL's multimodal RoPE) the
    model computes them: `[3, B, T]` (temporal, height, width) and a delta `[B, 1]`; otherwise
    `[B, T]` from the mask and no delta."""
    get_rope_index = getattr(getattr(base, "base_model", None), "get_rope_index", None)
    visual = shared.get("image_grid_thw") is not None or shared.get("video_grid_thw") is not None
    if get_rope_index is None or not visual:
        return text_positions(mask), None
    accepted = inspect.signature(get_rope_index).parameters
    extra = {k: v for k, v in shared.items() if k in accepted}
    positions, delta = get_rope_index(input_ids, attention_mask=mask, **extra)  # [3, B, T], [B, 1]
    return positions, delta


def step_positions(mask: torch.Tensor, n_new: int, delta: torch.Tensor | None) -> torch.Tensor:
    """Positions of the last `n_new` tokens of `mask` `[B, T]` during decoding: `[B, n]`, or with a
    rope delta `[3, B, n]` (text tokens after an image move along all three axes together)."""
    positions = text_positions(mask)[:, -n_new:]  # [B, n]
    if delta is None:
        return positions
    return (positions + delta.to(positions.device))[None].expand(3, -1, -1)


def select_rows(shared: dict[str, Any], keep: torch.Tensor, n_rows: int) -> dict[str, Any]:
    """`shared` for the rows `keep` `[b]` of a batch of `n_rows` (finished rows leave the batch).

    Batch-first tensors (Idefics3's `pixel_values` `[B, I, C, H, W]`, `mm_token_type_ids`) are
    indexed; Qwen2-VL's flat patches `[P, D]` with grids `[I, 3]` keep the images of the kept rows,
    counted as runs of placeholder tokens in `mm_token_type_ids`."""
    if not shared:
        return shared
    out = dict(shared)
    types = shared.get("mm_token_type_ids")  # [B, T]
    for pixels, grid, kind in (("pixel_values", "image_grid_thw", 1), ("pixel_values_videos", "video_grid_thw", 2)):
        if shared.get(grid) is None or types is None:
            continue
        is_kind = types == kind  # [B, T]
        starts = is_kind & ~torch.cat([is_kind.new_zeros(n_rows, 1), is_kind[:, :-1]], dim=1)
        image_row = torch.repeat_interleave(torch.arange(n_rows, device=types.device), starts.sum(1))  # [I]
        kept_images = torch.isin(image_row, keep.to(types.device))  # [I]
        out[grid] = shared[grid][kept_images.to(shared[grid].device)]
        if shared.get(pixels) is not None:
            patches = torch.repeat_interleave(kept_images, shared[grid].prod(-1).to(kept_images.device))  # [P]
            out[pixels] = shared[pixels][patches.to(shared[pixels].device)]
    for name, value in shared.items():
        if name not in out or out[name] is not value:
            continue  # already selected above
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n_rows:
            out[name] = value[keep.to(value.device)]
    return out
