"""Tiny random vision-language models (Qwen2-VL, Idefics3) and their inputs, built locally."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 160
IMAGE, VIDEO, START, END = 150, 151, 152, 153  # special ids at the top of the vocabulary
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,  # sharp attention: a position off by one changes the logits (0.02 hides it)
)


@dataclass
class Family:
    """One VLM family: how to build it, where its language model lives, how to feed it an image."""

    name: str
    cls: type
    language_model: str  # regex fragment of the language model's module path
    tokens_per_image: int

    def config(self) -> Any:
        if self.name == "qwen2-vl":
            return Qwen2VLConfig(
                text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                # patch 4, merge 2: an image of grid (t, h, w) = (1, 4, 4) is 16 patches -> 4 image tokens
                vision_config=dict(
                    depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4, in_channels=3
                ),
                image_token_id=IMAGE,
                video_token_id=VIDEO,
                vision_start_token_id=START,
                vision_end_token_id=END,
                tie_word_embeddings=False,
                **{k: TEXT[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
            )
        return Idefics3Config(
            text_config=dict(TEXT, model_type="llama"),
            # SigLIP: 32x32 pixels, patch 8 -> 16 patches; pixel shuffle by 2 -> 4 image tokens
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            scale_factor=2,
            image_token_id=IMAGE,
            tie_word_embeddings=False,
        )

    def save(self, path: Path, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        model = self.cls(self.config())
        with torch.no_grad():  # never predict a special token: greedy recomputation with images stays valid
            model.lm_head.weight[IMAGE:] = 0
        model.save_pretrained(path)
        return path

    def load(self, path: Path) -> torch.nn.Module:
        return self.cls.from_pretrained(path, dtype=torch.float32).eval()

    def images(self, n_rows: int, seed: int) -> dict[str, torch.Tensor]:
        """Random image inputs for one image per row, in the layout the model takes without a processor."""
        g = torch.Generator().manual_seed(seed)
        if self.name == "qwen2-vl":  # flattened patches [rows * 16, C * temporal_patch * patch^2], grid per image
            return {
                "pixel_values": torch.randn(n_rows * 16, 3 * 2 * 4 * 4, generator=g),
                "image_grid_thw": torch.tensor([[1, 4, 4]] * n_rows),
            }
        return {  # [B, images, C, H, W] and the pixel mask [B, images, H, W]
            "pixel_values": torch.randn(n_rows, 1, 3, 32, 32, generator=g),
            "pixel_attention_mask": torch.ones(n_rows, 1, 32, 32, dtype=torch.bool),
        }

    def prompt(self, pad: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts: text, an image (start, 4 placeholders, end), text; `pad[i]` pads row i."""
        g = torch.Generator().manual_seed(seed)
        rows = []
        for n_pad in pad:
            before, after = torch.randint(3, 140, (3,), generator=g), torch.randint(3, 140, (4,), generator=g)
            image = torch.tensor([START] + [IMAGE] * self.tokens_per_image + [END])
            rows.append(torch.cat([torch.zeros(n_pad, dtype=torch.long), before, image, after]))
        width = max(len(r) for r in rows)
        ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            mask[i, width - len(r) + pad[i] :] = 1
        return ids, mask


QWEN2_VL = Family("qwen2-vl", Qwen2VLForConditionalGeneration, "language_model", 4)
IDEFICS3 = Family("idefics3", Idefics3ForConditionalGeneration, "text_model", 4)
FAMILIES = {f.name: f for f in (QWEN2_VL, IDEFICS3)}


def make_vlm_adapter(family: Family, base_dir: Path, out: Path, targets: Any, r: int, alpha: float, seed: int) -> Path:
    """A PEFT LoRA adapter on the VLM with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(family.load(base_dir), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    model.save_pretrained(out)
    return out


def make_vlm_experts(family: Family, root: Path, base_dir: Path) -> dict[str, Path]:
    """Two experts on the language model only (different ranks, alphas, targets)."""
    lm = family.language_model
    return {
        "charts": make_vlm_adapter(family, base_dir, root / "charts", rf".*{lm}.*\.(q_proj|v_proj|down_proj)", 4, 8, 1),
        "photos": make_vlm_adapter(family, base_dir, root / "photos", rf".*{lm}.*\.(k_proj|o_proj|up_proj)", 2, 4, 2),
    }
