"""Reading and writing an X-LoRA checkpoint in either layout (native or PEFT), and the model's own
`XLoraModel.from_pretrained` / `save_pretrained`, which the core reaches through `register_checkpoint_io`
(the core never imports this layer)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from xlora.core.config import CheckpointError, read_json_object
from xlora.core.experts import ExpertSpec, load_experts
from xlora.core.model import XLoraModel, register_checkpoint_io
from xlora.core.multimodal import text_config
from xlora.formats.atomic import recover_directory
from xlora.formats.native import (
    CONFIG_NAME,
    StoredCheckpoint,
    check_classifier,
    check_classifier_names,
    checkpoint_file,
    contents_of,
    read_native,
    write_native,
)
from xlora.formats.peft import read_peft, write_peft


def save_checkpoint(model: XLoraModel, path: Path, overwrite: bool = True, format: str = "native") -> Path:
    """Save `model` as `format` ("native" or "peft")."""
    if format == "native":
        return write_native(contents_of(model), path, overwrite)
    if format == "peft":
        return write_peft(contents_of(model), path, overwrite)
    raise ValueError(f"format: expected 'native' or 'peft', got {format!r}")


def detect_format(path: Path) -> str:
    """'native' (xlora_config.json) or 'peft' (adapter_config.json with peft_type XLORA)."""
    path = Path(path)
    if not path.is_dir():
        recover_directory(path)  # a save killed between its two renames leaves the complete copy aside
    if path.is_file():
        raise CheckpointError(f"{path}: is a file; expected an X-LoRA checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if checkpoint_file(path, CONFIG_NAME).is_file():
        return "native"
    peft_config = checkpoint_file(path, "adapter_config.json")
    if peft_config.is_file():
        peft_type = str(read_json_object(peft_config).get("peft_type", "")).upper()
        if peft_type == "XLORA":
            return "peft"
        raise CheckpointError(
            f"{path / 'adapter_config.json'}: peft_type {peft_type!r} is not an X-LoRA checkpoint "
            "(expected 'XLORA'; a 'LORA' directory is an expert: pass it in the experts mapping)"
        )
    raise CheckpointError(f"{path}: no {CONFIG_NAME}; expected an X-LoRA checkpoint directory")


def read_checkpoint(path: Path, adapters: ExpertSpec | None = None) -> StoredCheckpoint:
    """Read a native or PEFT X-LoRA checkpoint directory.

    A classifier with missing tensors (as PEFT >= 0.20 saves them) is refused here, before any
    expert's weights are read, so that every reader (load, convert, export-ordering) gives the same
    message and hint."""
    if detect_format(path) == "native":
        stored = read_native(Path(path), adapters)
    else:
        stored = read_peft(Path(path), adapters)
    check_classifier_names(stored.classifier, stored.config, stored.classifier_path, stored.missing_hint)
    return stored


def load_checkpoint(
    base: nn.Module,
    path: Path,
    adapters: ExpertSpec | None = None,
    classifier_dtype: torch.dtype | None = torch.float32,
) -> XLoraModel:
    """Rebuild an XLoraModel on `base` from a native or PEFT checkpoint directory."""
    stored = read_checkpoint(Path(path), adapters)  # refuses a classifier with missing tensors
    experts, modules = load_experts(base, list(zip(stored.names, stored.expert_dirs)))
    # check the classifier before touching the base model
    if stored.config.hidden_size is None:
        stored.config.hidden_size = int(text_config(base).hidden_size)
    state = check_classifier(
        stored.classifier, stored.config, len(experts), len(modules), stored.classifier_path, stored.missing_hint
    )
    model = XLoraModel(
        base, experts, modules, stored.config, base_model_id=stored.base_model_id, classifier_dtype=classifier_dtype
    )
    model.classifier.load_state_dict({k: v.to(model.classifier.layers[0].weight.dtype) for k, v in state.items()})
    return model


register_checkpoint_io(load_checkpoint, save_checkpoint)
