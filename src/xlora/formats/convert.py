"""File-level conversion between checkpoint layouts, and the mistral.rs ordering file.

Conversion needs no base model: it reads a checkpoint, checks the classifier against the number of
experts and of adapted modules (the union of the experts' targets), and writes the other layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xlora.core.config import write_text_atomic
from xlora.core.experts import check_experts, read_expert
from xlora.formats.atomic import check_output
from xlora.formats.checkpoint import read_checkpoint
from xlora.formats.native import (
    CheckpointContents,
    StoredCheckpoint,
    check_classifier,
    copy_adapter_folder,
    to_original_keys,
    write_native,
)


@dataclass
class TensorReport:
    """One line of the conversion report."""

    kind: str  # "classifier" or "expert"
    source: str
    destination: str
    shape: tuple[int, ...]
    dtype: str


def _n_modules(stored: StoredCheckpoint) -> int:
    modules: set[str] = set()
    for name, folder in zip(stored.names, stored.expert_dirs):
        modules.update(read_expert(name, folder).weights)
    return len(modules)


def convert_checkpoint(src: Path, dst: Path, to: str, overwrite: bool = False) -> list[TensorReport]:
    """Convert `src` (native or PEFT) to `to` ("native" or "peft") at `dst`; return a per-tensor report."""
    if to not in ("native", "peft"):
        raise ValueError(f"--to: expected 'native' or 'peft', got {to!r}")
    check_output(dst, overwrite, reads=[src], directory=True, replaces="xlora")
    stored = read_checkpoint(Path(src))
    if stored.config.hidden_size is None:
        first = next(iter(stored.classifier.values()))
        stored.config.hidden_size = int(first.shape[-1])
    state = check_classifier(
        stored.classifier,
        stored.config,
        len(stored.names),
        _n_modules(stored),
        stored.classifier_path,
        stored.missing_hint,
    )
    contents = CheckpointContents(
        config=stored.config,
        names=stored.names,
        classifier=state,
        base_model_id=stored.base_model_id,
        write_expert=lambda i, dest: copy_adapter_folder(stored.expert_dirs[i], dest),
    )
    raw_by_norm = _source_names(stored)
    if to == "native":
        dest_names = to_original_keys(dict.fromkeys(state), stored.config)
        dest_of = dict(zip(state, dest_names))
    else:
        from xlora.formats.peft import PREFIX

        dest_of = {k: PREFIX + k for k in state}
    report = [
        TensorReport("classifier", raw_by_norm[k], dest_of[k], tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in state.items()
    ]
    for i, (name, folder) in enumerate(zip(stored.names, stored.expert_dirs)):
        target = name if to == "native" else str(i)
        for module, (a, b) in read_expert(name, folder).weights.items():
            for part, t in (("lora_A", a), ("lora_B", b)):
                report.append(
                    TensorReport(
                        "expert",
                        f"{folder.name}/{module}.{part}",
                        f"{target}/{module}.{part}",
                        tuple(t.shape),
                        str(t.dtype).removeprefix("torch."),
                    )
                )
    # write last: everything above read the source, which may not survive a mistake in DST
    if to == "native":
        write_native(contents, Path(dst), overwrite)
    else:
        from xlora.formats.peft import write_peft

        write_peft(contents, Path(dst), overwrite)
    return report


def _source_names(stored: StoredCheckpoint) -> dict[str, str]:
    """Normalised classifier key -> the key as stored in the source file."""
    from xlora.formats.native import from_original_keys

    out = {}
    for raw in stored.classifier:
        (norm,) = from_original_keys({raw: None}, stored.config)
        out[norm] = raw
    return out


def meta_base(base_dir: Path) -> nn.Module:
    """The base model's module tree without weights (meta device), for numbering adapted modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def ordering(stored: StoredCheckpoint, base: nn.Module) -> dict:
    """mistral.rs ordering: expert order and the adapted-module numbering (named_modules order)."""
    experts = [read_expert(n, d) for n, d in zip(stored.names, stored.expert_dirs)]
    modules = check_experts(base, experts)
    return {
        "base_model_id": stored.base_model_id,
        "order": list(stored.names),
        "layers": {name: i for i, name in enumerate(modules)},
    }


def export_ordering(checkpoint: Path, out: Path, base_dir: Path, overwrite: bool = False) -> dict:
    """Write the ordering file of `checkpoint` for the base model in `base_dir` (atomically); an existing
    `out` only with `overwrite`, and never inside the checkpoint or the base model folder."""
    check_output(out, overwrite, reads=[checkpoint, base_dir])
    data = ordering(read_checkpoint(Path(checkpoint)), meta_base(Path(base_dir)))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out), json.dumps(data, indent=2) + "\n")
    return data
