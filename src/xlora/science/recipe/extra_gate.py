"""A gate trained like the shipped one, on the reproduce run's gate data plus extra examples: how the
composite and general-prompt experiments test what a gate learns from data it has not seen."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from xlora.science.tasks import Item


def train_gate_plus(work: Path, checkpoint: Path, extra: list[Item], name: str, steps: int | None = None) -> Path:
    """Train a gate over `checkpoint`'s experts (frozen) on its run's gate data (`stage_general`) plus `extra`,
    with the gate settings and base of the checkpoint's reproduce run (its manifest); `steps` defaults
    to one pass. Written to `work/name` (resumable: a finished gate there is returned as it is)."""
    from xlora.bases.loading import load_base
    from xlora.core.model import XLoraModel
    from xlora.science.recipe.pipeline import (
        config_from_manifest,
        gate_args,
        gate_config,
        stage_general,
        write_text_atomic,
    )
    from xlora.train.api import train_gate
    from xlora.train.data import load_dataset

    out = work / name
    if (out / "xlora_config.json").is_file():
        return out
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    cfg = replace(config_from_manifest(manifest["config"]), work=work, out=out)
    rows = stage_general(cfg).read_text().splitlines()  # the run's own gate data (general prompts too, if any)
    for it in extra:
        chat = [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": it.answer}]
        rows.append(json.dumps({"messages": chat}))
    data = work / "data" / f"{name}-train.jsonl"
    write_text_atomic(data, "".join(r + "\n" for r in rows))
    base, tok = load_base(cfg.base)
    names = json.loads((checkpoint / "xlora_config.json").read_text())["adapters"]
    torch.manual_seed(cfg.seed)
    model = XLoraModel.from_experts(base, {n: checkpoint / n for n in names}, gate_config(cfg), base_model_id=cfg.base)
    ds = load_dataset(data, tok, cfg.max_length)
    steps = steps or math.ceil(len(ds) / cfg.batch_size)
    print(f"training gate {name}: {len(ds)} examples ({len(extra)} extra), {steps} steps", flush=True)
    args = gate_args(cfg, out, name, steps)  # the run's precision and routing prior too
    train_gate(model, ds, None, args, pad_token_id=tok.pad_token_id or 0)
    return out


__all__ = ["train_gate_plus"]
