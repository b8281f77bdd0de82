"""PEFT's X-LoRA directory format: read it (with its bugs detected), and write one PEFT 0.21 loads.

    peft-xlora/
      adapter_config.json        peft_type "XLORA", gate fields, "adapters": {"0": path, ...}
      adapter_model.safetensors  base_model.internal_xlora_classifier.layers.{i}.weight|bias
      0/ 1/ ...                  the experts (PEFT needs the names "0".."N-1")
      xlora_expert_names.json    our addition: the experts' real names, in order

PEFT >= 0.20 saves such directories with only part of the classifier; we refuse those instead of
running with random weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import save_file

from xlora.core.config import XLoraConfig, XLoraConfigError, read_json_object, write_text_atomic
from xlora.core.experts import ExpertError, ExpertSpec, check_expert_name
from xlora.formats.native import (
    CheckpointContents,
    CheckpointError,
    StoredCheckpoint,
    atomic_directory,
    check_destination,
    check_stored_fields,
    checkpoint_file,
    load_classifier_state,
    resolve_expert_dirs,
    stored_expert_path,
)

PREFIX = "base_model.internal_xlora_classifier."
NAMES_FILE = "xlora_expert_names.json"
# PeftConfig / PEFT XLoraConfig fields that are not gate options.
PEFT_ONLY_FIELDS = (
    "adapters",
    "auto_mapping",
    "base_model_name_or_path",
    "inference_mode",
    "peft_type",
    "peft_version",
    "revision",
    "task_type",
)
# Our options that PEFT's X-LoRA does not have, with the value PEFT implicitly uses.
PEFT_FIXED = {"enable_relu_and_dropout": True, "use_bias": True}
PEFT_MISSING_HINT = (
    "PEFT >= 0.20 saves X-LoRA checkpoints without all classifier weights; re-save the model with "
    "xlora's save_pretrained, or retrain the gate"
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=@ -]")


def sanitize_names(raw: list[str], source: Path) -> list[str]:
    """Foreign expert names -> folder-safe names; two names that collide after this are an error."""
    out: list[str] = []
    for name in raw:
        clean = _UNSAFE.sub("_", str(name)).lstrip(".") or "expert"
        if clean in out:
            first = raw[out.index(clean)]
            raise CheckpointError(f"{source}: expert names {first!r} and {name!r} both become {clean!r}")
        out.append(clean)
    return out


def _is_plain_folder_name(key: str) -> bool:
    try:
        check_expert_name(key)
    except ExpertError:
        return False
    return True


def read_peft(path: Path, adapters: ExpertSpec | None = None) -> StoredCheckpoint:
    cfg_path = checkpoint_file(path, "adapter_config.json")
    data = read_json_object(cfg_path)
    stored = data.get("adapters")
    if not isinstance(stored, dict) or not stored:
        raise XLoraConfigError(f"{cfg_path}: field 'adapters' must map expert keys to adapter paths")
    gate = {k: v for k, v in data.items() if k not in PEFT_ONLY_FIELDS}
    config = XLoraConfig.from_dict(gate, source=str(cfg_path))
    keys = list(stored)
    names_file = checkpoint_file(path, NAMES_FILE)
    if names_file.is_file():
        names = read_json_object(names_file).get("names")
        if not isinstance(names, list) or len(names) != len(keys):
            raise CheckpointError(f"{names_file}: expected 'names' listing {len(keys)} expert names")
        names = [check_expert_name(n, names_file) for n in names]
        if len(set(names)) != len(names):
            raise CheckpointError(f"{names_file}: expert names must be distinct, got {names!r}")
    else:
        names = sanitize_names(keys, cfg_path)
    # the checkpoint's own folder first (a copied checkpoint must not load the original's experts),
    # then the stored path only if it stays inside the checkpoint
    candidates = []
    for key, clean in zip(keys, sanitize_names(keys, cfg_path)):
        own = path / (key if _is_plain_folder_name(key) else clean)
        elsewhere = stored_expert_path(path, stored[key])
        candidates.append([own] + ([elsewhere] if elsewhere is not None else []))
    dirs = resolve_expert_dirs(path, names, candidates, adapters)
    weight_files = (checkpoint_file(path, name) for name in ("adapter_model.safetensors", "adapter_model.bin"))
    clf_path = next((p for p in weight_files if p.is_file()), None)
    if clf_path is None:
        raise CheckpointError(f"{path}: no adapter_model.safetensors or .bin; classifier weights missing")
    raw = load_classifier_state(clf_path)
    state = {k: v for k, v in raw.items() if "internal_xlora_classifier." in k}
    other = sorted(set(raw) - set(state))
    if other:
        raise CheckpointError(f"{clf_path}: unexpected tensors {', '.join(other[:3])} (expected only the classifier)")
    check_stored_fields(config, len(names), data.get("base_model_name_or_path"), cfg_path, "base_model_name_or_path")
    return StoredCheckpoint(
        config=config,
        names=names,
        expert_dirs=dirs,
        classifier=state,
        classifier_path=clf_path,
        base_model_id=data.get("base_model_name_or_path"),
        missing_hint=PEFT_MISSING_HINT,
    )


def peft_config_dict(contents: CheckpointContents, final: Path) -> dict:
    """adapter_config.json for PEFT; refuses options PEFT's X-LoRA cannot express."""
    cfg = contents.config
    if cfg.scaling_pass_layers is not None:
        raise CheckpointError(
            f"scaling_pass_layers={cfg.scaling_pass_layers} (an early gate) cannot be written in PEFT format: "
            "PEFT's scaling pass always runs every layer; save in the native format instead"
        )
    for field, value in PEFT_FIXED.items():
        if getattr(cfg, field) != value:
            raise CheckpointError(
                f"{field}={getattr(cfg, field)} cannot be written in PEFT format (PEFT fixes {value})"
            )
    gate = cfg.to_dict()
    for field in (*PEFT_FIXED, "reuse_scalings_after"):
        gate.pop(field)
    if gate["scaling_pass_value"] is None:  # PEFT needs the number
        gate["scaling_pass_value"] = 1.0 / len(contents.names)
    return {
        "peft_type": "XLORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": contents.base_model_id,
        "inference_mode": True,
        **gate,
        "adapters": {str(i): str(final / str(i)) for i in range(len(contents.names))},
    }


def write_peft(contents: CheckpointContents, path: Path, overwrite: bool = True) -> Path:
    """Write a PEFT X-LoRA directory (atomically) that `PeftModel.from_pretrained` loads as is."""
    check_destination(path, overwrite)  # errors name the path as the caller gave it
    final = Path(path).resolve()
    config = peft_config_dict(contents, final)
    with atomic_directory(final, overwrite) as tmp:
        write_text_atomic(tmp / "adapter_config.json", json.dumps(config, indent=2) + "\n")
        save_file({PREFIX + k: v for k, v in contents.classifier.items()}, str(tmp / "adapter_model.safetensors"))
        write_text_atomic(tmp / NAMES_FILE, json.dumps({"names": contents.names}, indent=2) + "\n")
        for i in range(len(contents.names)):
            contents.write_expert(i, tmp / str(i))
    return final
