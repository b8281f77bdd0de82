"""Why no dynamic-int8 base ships (README "Real bases"): PyTorch's dynamic int8 (per-channel weights)
on the embedded SmolLM2, every Linear or all but down_proj (and lm_head): plain-base decode speed
(transformers generate, 48 greedy tokens, one timed run after a warm-up) and the shipped X-LoRA's
answer loss on the first 24 items of the properties and peptides test sets (chat files).

    python experiments/dynamic_int8.py --data DIR_WITH_TASK-eval-chat.jsonl

Backs the figures quoted in docs/guide/bases.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from xlora import XLoraModel, shipped_checkpoint
from xlora.bases.loading import load_base

VARIANTS = {
    "fp32": None,
    "int8 all": [],
    "int8 no down_proj": ["down_proj"],
    "int8 no down,head": ["down_proj", "lm_head"],
}


def quantized(skip: list[str] | None):
    """The default base, its Linear layers (except names containing `skip`) in dynamic int8."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    base, tok = load_base("default")
    if skip is not None:
        linear = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
        spec = {n: per_channel_dynamic_qconfig for n in linear if not any(s in n for s in skip)}
        quantize_dynamic(base, spec, dtype=torch.qint8, inplace=True)
    return base, tok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    a = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from real_model import item_losses

    for name, skip in VARIANTS.items():
        base, tok = quantized(skip)
        ids = tok("Peptide GLFDIVKKVVGALGSL. Is it antimicrobial?", return_tensors="pt")["input_ids"]
        base.generate(ids, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        base.generate(ids, max_new_tokens=48, min_new_tokens=48, do_sample=False)
        rate = 48 / (time.perf_counter() - t0)
        model = XLoraModel.from_pretrained(base, shipped_checkpoint())
        losses = []
        for task in ("molecule-properties", "peptides"):
            s, c = item_losses(model, tok, a.data / f"{task}-eval-chat.jsonl", limit=24)
            losses.append(f"{float(s.sum() / c.sum()):.3f}")
        print(f"{name}: plain base {rate:.1f} tokens/s; X-LoRA loss properties / peptides {' / '.join(losses)}")


if __name__ == "__main__":
    main()
