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
IMAGE_PREFIXES = _SHARED_PREFIXES  # keywords with these prefixes are image inputs (checked, both passes)
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


def image_keywords(base: nn.Module | None) -> frozenset[str]:
    """The image keywords `base.forward` names (`pixel_values`, `image_grid_thw`, ...), plus the
    `mm_token_type_ids` we derive; for a base that names none (a text-only LM), every shared name."""
    params = inspect.signature(base.forward).parameters if base is not None else {}
    named = {n for n in params if n.startswith(_SHARED_PREFIXES) or n in _SHARED_NAMES}
    return frozenset(named | {"mm_token_type_ids"}) if named else frozenset()


def check_image_keywords(names: Any, base: nn.Module | None = None, where: str = "generate()") -> None:
    """Image inputs must be ones the base's forward takes: any other keyword (a typo such as
    `max_tokens=` or `pixel_valuez=`) is a TypeError, as in a plain function call, never silently
    swallowed by the model's `**kwargs`."""
    names = list(names)
    if not names:  # the usual text-only call: no signature inspection on every forward
        return
    known = image_keywords(base)
    wrong = [n for n in names if not (n.startswith(_SHARED_PREFIXES) or n in _SHARED_NAMES)]
    if known:
        wrong += [n for n in names if n not in known and n not in wrong]
    if wrong:
        takes = ", ".join(sorted(known)) if known else "names starting with pixel_, image_, video_ or mm_"
        raise TypeError(
            f"{where} got unexpected keyword argument(s) {wrong}; besides its options it takes image inputs "
            f"only ({takes})"
        )


def _placeholder_count(base: nn.Module, input_ids: torch.Tensor | None, attr: str) -> int:
    token = getattr(base.config, attr, None)
    return int((input_ids == token).sum()) if token is not None and input_ids is not None else 0


def check_image_inputs(base: nn.Module, input_ids: torch.Tensor | None, shared: dict[str, Any]) -> None:
    """Image inputs that fit the prompt, or a ValueError saying what does not fit (instead of a raw
    shape error deep in the vision tower, or an answer generated without the image): finite pixels,
    pixels for every placeholder run and a placeholder run for every image."""
    for name, value in shared.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: holds NaN or inf values; expected finite pixel values")
    for pixels, grid, attr, what in (
        ("pixel_values", "image_grid_thw", "image_token_id", "image"),
        ("pixel_values_videos", "video_grid_thw", "video_token_id", "video"),
    ):
        n_tokens = _placeholder_count(base, input_ids, attr)
        given = shared.get(pixels) is not None or (what == "image" and shared.get("mm_encoder_outputs") is not None)
        if n_tokens and not given:
            raise ValueError(f"input_ids hold {n_tokens} {what} placeholder token(s) but no {pixels} were given")
        if given and input_ids is not None and not n_tokens and getattr(base.config, attr, None) is not None:
            raise ValueError(
                f"{pixels} given but input_ids hold no {what} placeholder token (id {getattr(base.config, attr)}); "
                "build the prompt with the model's processor"
            )
        if shared.get(pixels) is not None and grid in image_keywords(base):
            _check_grid(base, input_ids, shared, pixels, grid, attr, what)
        elif what == "image" and shared.get(pixels) is not None:
            _check_batched_images(base, input_ids, shared[pixels], n_tokens)


def _check_grid(
    base: nn.Module, input_ids: torch.Tensor | None, shared: dict, pixels: str, grid: str, attr: str, what: str
) -> None:
    """Qwen2-VL style: flat patches `[P, D]`, one `[t, h, w]` grid row per image, and per image a run
    of t*h*w / merge^2 placeholder tokens."""
    thw = shared.get(grid)
    if thw is None:
        raise ValueError(f"{pixels} given without {grid} (the [t, h, w] patch grid of each {what})")
    if thw.dim() != 2 or thw.shape[1] != 3:
        raise ValueError(f"{grid}: expected [{what}s, 3] (t, h, w per {what}), got {list(thw.shape)}")
    patches = int(thw.prod(-1).sum())
    if shared[pixels].shape[0] != patches:
        raise ValueError(
            f"{pixels}: {shared[pixels].shape[0]} patch rows, but {grid} describes {patches} "
            f"for {thw.shape[0]} {what}(s)"
        )
    if input_ids is None:
        return
    token = getattr(base.config, attr)
    is_kind = input_ids == token  # [B, T]
    starts = is_kind & ~torch.cat([is_kind.new_zeros(is_kind.shape[0], 1), is_kind[:, :-1]], dim=1)
    runs = int(starts.sum())
    if runs != thw.shape[0]:
        raise ValueError(
            f"input_ids hold {runs} {what} placeholder run(s) but {grid} describes {thw.shape[0]} {what}(s)"
        )
    merge = getattr(getattr(base.config, "vision_config", None), "spatial_merge_size", 1) or 1
    want = int((thw.prod(-1) // merge**2).sum())
    if int(is_kind.sum()) != want:
        raise ValueError(
            f"input_ids hold {int(is_kind.sum())} {what} placeholder tokens; {grid} needs {want} "
            f"(t*h*w / {merge}^2 per {what})"
        )


def _check_batched_images(base: nn.Module, input_ids: torch.Tensor | None, pixels: torch.Tensor, n_tokens: int) -> None:
    """Idefics3 style: `[B, I, C, H, W]` (all-zero images are padding) and a fixed number of
    placeholder tokens per real image."""
    if pixels.dim() != 5:
        raise ValueError(f"pixel_values: expected [batch, images, channels, height, width], got {list(pixels.shape)}")
    if input_ids is not None and pixels.shape[0] != input_ids.shape[0]:
        raise ValueError(f"pixel_values: {pixels.shape[0]} rows of images for a batch of {input_ids.shape[0]}")
    vision = getattr(base.config, "vision_config", None)
    scale = getattr(base.config, "scale_factor", None)
    if input_ids is None or vision is None or not scale:
        return
    per_image = (vision.image_size // vision.patch_size) ** 2 // scale**2
    real = int((pixels.flatten(2) != 0).any(-1).sum())  # all-zero images are the processor's padding
    if n_tokens != real * per_image:
        raise ValueError(
            f"input_ids hold {n_tokens} image placeholder tokens; {real} image(s) need {real * per_image} "
            f"({per_image} each)"
        )


def check_vision_base(base: nn.Module, shared: dict[str, Any]) -> None:
    """Image inputs on a text-only base would be dropped silently (its forward swallows keywords):
    refuse them with an error naming the inputs."""
    if shared and language_model_name(base) is None:
        raise ValueError(
            f"{', '.join(sorted(shared))}: {type(base).__name__} is a text-only base model; "
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
