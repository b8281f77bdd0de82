"""Native checkpoints: the original package's layout, written atomically, read back bit-exactly.

    my-xlora/
      xlora_config.json              XLoraConfig fields + "adapters" (names in order) + "base_model_id"
      xlora_classifier.safetensors   the original's key names: inner.{i}.weight|bias, last.weight|bias
      <expert name>/                 one self-contained PEFT LoRA adapter folder per expert

In memory the classifier keeps PEFT's `layers.{i}` keys; the mapping happens here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import XLoraConfig, XLoraConfigError, read_json_object
from .experts import ExpertError, ExpertSpec, load_experts, normalize_expert_spec

if TYPE_CHECKING:
    from .model import XLoraModel

CONFIG_NAME = "xlora_config.json"
CLASSIFIER_NAME = "xlora_classifier.safetensors"
CLASSIFIER_PT_NAME = "xlora_classifier.pt"
# Fields that checkpoint files carry besides XLoraConfig's own (ours and the original package's).
EXTRA_FIELDS = ("adapters", "base_model_id", "device", "model_type", "xlora_format")


class CheckpointError(ValueError):
    """A checkpoint directory is unusable; the message names the file and what was expected."""


def _linear_indices(classifier_layers: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(classifier_layers) if isinstance(m, nn.Linear)]


def to_original_keys(state: dict[str, torch.Tensor], config: XLoraConfig, layers: nn.Sequential) -> dict:
    """PEFT `layers.{i}` keys -> the original package's `inner.{j}` / `last` keys."""
    linear = _linear_indices(layers)
    step = 3 if config.enable_relu_and_dropout else 1  # the original always adds ReLU + Dropout
    names = {idx: f"inner.{k * step}" for k, idx in enumerate(linear[:-1])}
    names[linear[-1]] = "last"
    out = {}
    for key, value in state.items():
        idx, _, param = key.removeprefix("layers.").partition(".")
        out[f"{names[int(idx)]}.{param}"] = value
    return out


def from_original_keys(state: dict[str, torch.Tensor], config: XLoraConfig, layers: nn.Sequential) -> dict:
    """Accept PEFT (`layers.{i}`, optionally prefixed) or original (`inner.{j}`, `last`) keys."""
    linear = _linear_indices(layers)
    step = 3 if config.enable_relu_and_dropout else 1
    names = {f"inner.{k * step}": idx for k, idx in enumerate(linear[:-1])}
    names["last"] = linear[-1]
    out = {}
    for key, value in state.items():
        key = key.split("internal_xlora_classifier.")[-1]
        module, _, param = key.rpartition(".")
        if module.startswith("layers."):
            out[key] = value
        elif module in names:
            out[f"layers.{names[module]}.{param}"] = value
        else:
            out[key] = value  # reported as unexpected by the caller
    return out


def load_classifier_state(path: Path) -> dict[str, torch.Tensor]:
    """Read classifier tensors from `.safetensors` or a `.pt` state dict (weights only)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a tensor state dict ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return data


def fill_classifier(model: XLoraModel, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `state` into the classifier; any missing, extra or mis-shaped tensor is an error."""
    clf = model.classifier
    original_names = any(k.startswith(("inner.", "last.")) for k in state)
    state = from_original_keys(state, model.config, clf.layers)
    expected = clf.state_dict()
    missing = sorted(set(expected) - set(state))
    if original_names:  # report in the file's own naming
        missing = sorted(to_original_keys(dict.fromkeys(missing), model.config, clf.layers))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(
            f"{source}: classifier weights missing ({', '.join(missing)}); refusing to run with random weights"
        )
    if unexpected:
        raise CheckpointError(f"{source}: unexpected classifier tensors {', '.join(unexpected)}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: classifier tensor {key} has shape {tuple(value.shape)}, expected "
                f"{tuple(expected[key].shape)} for {model.n_experts} experts, {model.n_layers} adapted "
                f"modules and hidden size {model.config.hidden_size}"
            )
    clf.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _write_expert(model: XLoraModel, index: int, dest: Path) -> None:
    """Write expert `index` as a PEFT adapter folder: copy its files, or its trained weights."""
    name = model.expert_names[index]
    src, adapter_config = model.expert_sources[name]
    dest.mkdir(parents=True)
    if not model.config.use_trainable_adapters:
        for fname in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"):
            if (src / fname).is_file():
                shutil.copy2(src / fname, dest / fname)
        return
    tensors = {}
    for module, layer in zip(model.module_names, model.xlora_layers):
        rows = (layer.row_expert == index).nonzero().squeeze(1)
        if rows.numel():
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.detach()[rows].contiguous().cpu()
            tensors[f"{prefix}.lora_B.weight"] = layer.lora_B.detach()[:, rows].contiguous().cpu()
    (dest / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    save_file(tensors, str(dest / "adapter_model.safetensors"))


def save_checkpoint(model: XLoraModel, path: Path, overwrite: bool = True) -> Path:
    """Write the checkpoint into a temporary sibling directory, then swap it into place."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        extra = {"adapters": model.expert_names, "base_model_id": model.base_model_id, "xlora_format": 1}
        model.config.to_json_file(tmp / CONFIG_NAME, extra=extra)
        state = {k: v.detach().contiguous().cpu() for k, v in model.classifier.state_dict().items()}
        save_file(to_original_keys(state, model.config, model.classifier.layers), str(tmp / CLASSIFIER_NAME))
        for i, name in enumerate(model.expert_names):
            _write_expert(model, i, tmp / name)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint_config(path: Path) -> tuple[XLoraConfig, list[str], dict]:
    """Read `xlora_config.json`: the config, the expert names in order, and the raw dict."""
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}; expected an X-LoRA checkpoint directory")
    data = read_json_object(cfg_path)
    config = XLoraConfig.from_dict(data, source=str(cfg_path), ignore=EXTRA_FIELDS)
    adapters = data.get("adapters")
    if isinstance(adapters, dict):
        names = list(adapters)
    elif isinstance(adapters, list) and all(isinstance(a, str) for a in adapters):
        names = list(adapters)
    else:
        raise XLoraConfigError(f"{cfg_path}: field 'adapters' must list the expert names, got {adapters!r}")
    return config, names, data


def resolve_adapters(path: Path, names: list[str], data: dict, adapters: ExpertSpec | None) -> list:
    """Expert (name, dir) pairs: `adapters` if given, else the checkpoint's own folders."""
    if adapters is not None:
        pairs = normalize_expert_spec(adapters)
        if [n for n, _ in pairs] != names:
            raise ExpertError(
                f"{path / CONFIG_NAME}: the checkpoint's experts are {names} (in this order); "
                f"the adapters given are {[n for n, _ in pairs]}"
            )
        return pairs
    stored = data.get("adapters") if isinstance(data.get("adapters"), dict) else {}
    pairs = []
    for name in names:
        folder = path / name
        if not folder.is_dir() and stored.get(name) and Path(stored[name]).is_dir():
            folder = Path(stored[name])
        if not folder.is_dir():
            raise CheckpointError(f"{path}: adapter folder {name}/ for expert {name!r} is missing")
        pairs.append((name, folder))
    return pairs


def load_checkpoint(base: nn.Module, path: Path, adapters: ExpertSpec | None = None) -> XLoraModel:
    """Rebuild an XLoraModel on `base` from a native checkpoint directory."""
    from .model import XLoraModel

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    config, names, data = read_checkpoint_config(path)
    pairs = resolve_adapters(path, names, data, adapters)
    clf_path = path / CLASSIFIER_NAME
    if not clf_path.is_file():
        clf_path = path / CLASSIFIER_PT_NAME
    if not clf_path.is_file():
        raise CheckpointError(f"{path}: no {CLASSIFIER_NAME} (or {CLASSIFIER_PT_NAME}); classifier weights missing")
    state = load_classifier_state(clf_path)
    experts, modules = load_experts(base, pairs)
    model = XLoraModel(base, experts, modules, config, base_model_id=data.get("base_model_id"))
    try:
        fill_classifier(model, state, clf_path)
    except BaseException:
        model.unload()  # leave the caller's base model as it was
        raise
    return model
