"""Checkpoints: the native layout (the original package's), shared helpers, and format dispatch.

Native layout (also the original `xlora` package's and `lamm-mit/x-lora`'s):

    my-xlora/
      xlora_config.json              XLoraConfig fields + "adapters" (names in order) + "base_model_id"
      xlora_classifier.safetensors   the original's key names: inner.{i}.weight|bias, last.weight|bias
      <expert name>/                 one self-contained PEFT LoRA adapter folder per expert

In memory the classifier keeps PEFT's `layers.{i}` keys; the mapping happens here. The PEFT X-LoRA
directory format lives in `peft_format.py`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xlora.core.checks import load_tensors_only
from xlora.core.classifier import build_layers
from xlora.core.config import CheckpointError, XLoraConfig, XLoraConfigError, read_json_object
from xlora.core.experts import ExpertError, ExpertSpec, check_expert_name, normalize_expert_spec
from xlora.formats.atomic import (  # noqa: F401 - re-exported: writers and tests import them from here
    atomic_directory,
    check_destination,
    check_file_destination,
    recover_directory,
)

if TYPE_CHECKING:
    from xlora.core.model import XLoraModel

CONFIG_NAME = "xlora_config.json"
CLASSIFIER_NAME = "xlora_classifier.safetensors"
CLASSIFIER_PT_NAME = "xlora_classifier.pt"
# Fields that native config files carry besides XLoraConfig's own (ours and the original package's).
FORMAT_VERSION = 1  # `xlora_format` of the native layout this version writes and reads
EXTRA_FIELDS = ("adapters", "base_model_id", "device", "model_type", "xlora_format")


@dataclass
class CheckpointContents:
    """Everything a checkpoint holds, independent of its on-disk layout."""

    config: XLoraConfig
    names: list[str]
    classifier: dict[str, torch.Tensor]  # PEFT layout: layers.{i}.weight|bias
    base_model_id: str | None
    write_expert: Callable[[int, Path], None]  # writes expert i as a PEFT adapter folder at the path


# ---------------------------------------------------------------------- classifier keys


def linear_positions(config: XLoraConfig) -> list[int]:
    """Indices of the Linear modules in PEFT's classifier `Sequential` for this config."""
    per_block = 1
    if config.enable_relu_and_dropout:
        per_block += 1 + (config.xlora_dropout_p > 0)
    return [k * per_block for k in range(config.xlora_depth - 1)] + [(config.xlora_depth - 1) * per_block]


def _original_names(config: XLoraConfig) -> dict[int, str]:
    """PEFT Sequential index -> the original package's module name (it always adds ReLU + Dropout)."""
    linear = linear_positions(config)
    step = 3 if config.enable_relu_and_dropout else 1
    names = {idx: f"inner.{k * step}" for k, idx in enumerate(linear[:-1])}
    names[linear[-1]] = "last"
    return names


def to_original_keys(state: dict[str, torch.Tensor], config: XLoraConfig) -> dict:
    """PEFT `layers.{i}.param` keys -> the original package's `inner.{j}.param` / `last.param`."""
    names = _original_names(config)
    out = {}
    for key, value in state.items():
        idx, _, param = key.removeprefix("layers.").partition(".")
        out[f"{names[int(idx)]}.{param}"] = value
    return out


def from_original_keys(state: dict[str, torch.Tensor], config: XLoraConfig) -> dict:
    """Normalise to PEFT keys; accepts `layers.{i}` (optionally with PEFT's prefix) or `inner.{j}`/`last`."""
    names = {v: k for k, v in _original_names(config).items()}
    out = {}
    for key, value in state.items():
        key = key.split("internal_xlora_classifier.")[-1]
        module, _, param = key.rpartition(".")
        out[f"layers.{names[module]}.{param}" if module in names else key] = value
    return out


def expected_classifier_shapes(config: XLoraConfig, n_experts: int, n_layers: int) -> dict[str, tuple]:
    n_out = n_experts * n_layers if config.layerwise_scalings else n_experts
    with torch.device("meta"):
        layers = build_layers(config, config.hidden_size, n_out)
    return {f"layers.{k}": tuple(v.shape) for k, v in layers.state_dict().items()}


def check_classifier_names(
    state: dict[str, torch.Tensor], config: XLoraConfig, source: Path, missing_hint: str = ""
) -> None:
    """Refuse a classifier with missing tensors (checked before any expert is read: needs no shapes)."""
    original_names = any(k.startswith(("inner.", "last.")) for k in state)
    with torch.device("meta"):
        expected = {f"layers.{k}" for k in build_layers(config, config.hidden_size or 1, 1).state_dict()}
    missing = sorted(set(expected) - set(from_original_keys(state, config)))
    if missing:
        if original_names:  # report in the file's own naming
            missing = sorted(to_original_keys(dict.fromkeys(missing), config))
        raise CheckpointError(
            f"{source}: classifier weights missing ({', '.join(missing)}); refusing to run with random weights"
            + (f". {missing_hint}" if missing_hint else "")
        )


def check_classifier(
    state: dict[str, torch.Tensor],
    config: XLoraConfig,
    n_experts: int,
    n_layers: int,
    source: Path,
    missing_hint: str = "",
) -> dict[str, torch.Tensor]:
    """Normalise keys and check every tensor against the config; return the PEFT-keyed state."""
    check_classifier_names(state, config, source, missing_hint)
    state = from_original_keys(state, config)
    expected = expected_classifier_shapes(config, n_experts, n_layers)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected classifier tensors {', '.join(unexpected)} for xlora_depth="
            f"{config.xlora_depth}, enable_relu_and_dropout={config.enable_relu_and_dropout}, "
            f"use_bias={config.use_bias}"
        )
    for key, value in state.items():
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{source}: classifier tensor {key} holds "
                + ("non-float values" if not value.is_floating_point() else "NaN or infinite values")
                + "; refusing to run with it"
            )
        if tuple(value.shape) != expected[key]:
            raise CheckpointError(
                f"{source}: classifier tensor {key} has shape {tuple(value.shape)}, expected "
                f"{expected[key]} for {n_experts} experts, {n_layers} adapted modules and hidden size "
                f"{config.hidden_size}"
            )
    return state


def load_classifier_state(path: Path) -> dict[str, torch.Tensor]:
    """Read classifier tensors from `.safetensors` or a `.pt`/`.bin` state dict (weights only)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        data = load_tensors_only(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return data


# ---------------------------------------------------------------------- writing


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")


def checkpoint_file(root: Path, name: str, what: str = "checkpoint") -> Path:
    """`root / name`, refused if it leads outside `root` (a symlink or `..`): the one check before every read.

    Every reader of a file that a checkpoint, adapter folder or run directory holds goes through this
    (config, classifier, expert files, names file, results, run state), so a symlinked
    `ck/a/adapter_config.json -> ~/.ssh/id_rsa` is never opened by any command. A missing file is
    returned as is (the caller reports it in its own words).
    """
    path = Path(root) / name
    if not (path.is_symlink() or path.exists()):
        return path
    resolved = path.resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise CheckpointError(f"{path}: leads outside its {what} folder (a symlink?); refusing to read it")
    if not resolved.is_file():
        raise CheckpointError(f"{path}: is a directory or a special file; expected a regular file")
    return path


def adapter_files(src: Path) -> list[Path]:
    """The adapter files of a folder, refusing any that leads outside it (a symlink to ~/.ssh/...)."""
    files = [checkpoint_file(src, fname, "adapter") for fname in ADAPTER_FILES]
    return [f for f in files if f.is_file()]


def copy_adapter_folder(src: Path, dest: Path) -> None:
    """Copy a PEFT adapter folder's files (config, weights, README), never through a symlink out of it."""
    files = adapter_files(src)
    dest.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, dest / f.name)


def write_expert_from_model(model: XLoraModel, index: int, dest: Path) -> None:
    """Write expert `index` as a PEFT adapter folder: copy its files, or its trained weights."""
    import json

    name = model.expert_names[index]
    src, adapter_config = model.expert_sources[name]
    if not model.config.use_trainable_adapters:
        copy_adapter_folder(src, dest)
        return
    dest.mkdir(parents=True)
    tensors = {}
    for module, layer in zip(model.module_names, model.xlora_layers):
        rows = (layer.row_expert == index).nonzero().squeeze(1)
        if rows.numel():
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.detach()[rows].contiguous().cpu()
            tensors[f"{prefix}.lora_B.weight"] = layer.lora_B.detach()[:, rows].contiguous().cpu()
    (dest / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    save_file(tensors, str(dest / "adapter_model.safetensors"))


def contents_of(model: XLoraModel) -> CheckpointContents:
    state = {k: v.detach().contiguous().cpu() for k, v in model.classifier.state_dict().items()}
    return CheckpointContents(
        config=model.config,
        names=model.expert_names,
        classifier=state,
        base_model_id=model.base_model_id,
        write_expert=lambda i, dest: write_expert_from_model(model, i, dest),
    )


def write_native(contents: CheckpointContents, path: Path, overwrite: bool = True) -> Path:
    """Write the native layout atomically."""
    with atomic_directory(path, overwrite) as tmp:
        extra = {"adapters": contents.names, "base_model_id": contents.base_model_id, "xlora_format": FORMAT_VERSION}
        contents.config.to_json_file(tmp / CONFIG_NAME, extra=extra)
        save_file(to_original_keys(contents.classifier, contents.config), str(tmp / CLASSIFIER_NAME))
        for i, name in enumerate(contents.names):
            contents.write_expert(i, tmp / check_expert_name(name))
    return Path(path)


# ---------------------------------------------------------------------- reading


@dataclass
class StoredCheckpoint:
    """A checkpoint read from disk: contents plus where the experts live."""

    config: XLoraConfig
    names: list[str]
    expert_dirs: list[Path]
    classifier: dict[str, torch.Tensor]  # raw keys, as stored
    classifier_path: Path
    base_model_id: str | None
    missing_hint: str = ""


def read_native_config(path: Path) -> tuple[XLoraConfig, list[str], dict]:
    """Read `xlora_config.json`: the config, the expert names in order, and the raw dict."""
    cfg_path = checkpoint_file(path, CONFIG_NAME)
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}; expected an X-LoRA checkpoint directory")
    data = read_json_object(cfg_path)
    config = XLoraConfig.from_dict(data, source=str(cfg_path), ignore=EXTRA_FIELDS)
    adapters = data.get("adapters")
    if isinstance(adapters, dict) or (isinstance(adapters, list) and all(isinstance(a, str) for a in adapters)):
        names = [check_expert_name(n, f"{cfg_path}: field 'adapters'") for n in adapters]
    else:
        raise XLoraConfigError(f"{cfg_path}: field 'adapters' must list the expert names, got {adapters!r}")
    if not names or len(set(names)) != len(names):
        raise XLoraConfigError(f"{cfg_path}: field 'adapters' must list distinct expert names, got {names!r}")
    check_stored_fields(config, len(names), data.get("base_model_id"), cfg_path, "base_model_id")
    version = data.get("xlora_format", FORMAT_VERSION)
    if version != FORMAT_VERSION:  # an unknown layout must not be read as if it were this one
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        why = "newer than this xlora reads; upgrade xlora" if newer else "not a format xlora writes"
        raise XLoraConfigError(f"{cfg_path}: field 'xlora_format' is {version!r}, {why} (it reads {FORMAT_VERSION})")
    return config, names, data


def check_stored_fields(config: XLoraConfig, n_experts: int, base_id: object, source: Path, id_field: str) -> None:
    """What a checkpoint's config must also satisfy: options that fit its experts, a string base id."""
    if base_id is not None and not isinstance(base_id, str):
        raise XLoraConfigError(f"{source}: field {id_field!r}: expected a model id string or null, got {base_id!r}")
    try:
        config.validate(n_experts=n_experts)
    except XLoraConfigError as e:
        raise XLoraConfigError(f"{source}: {e}") from None


def stored_expert_path(checkpoint: Path, stored: object) -> Path | None:
    """A path a checkpoint's own file names for an expert, if it stays inside the checkpoint.

    Relative paths are relative to the checkpoint (not the working directory). A path leading
    elsewhere (another machine's absolute path, `../x`, a symlink out) is ignored: only paths the
    caller passes (`adapters=`) may point outside the checkpoint.
    """
    if not isinstance(stored, str) or not stored:
        return None
    resolved = (checkpoint / stored).resolve()
    return resolved if resolved.is_relative_to(checkpoint.resolve()) else None


def resolve_expert_dirs(
    path: Path, names: list[str], candidates: list[list[Path]], adapters: ExpertSpec | None
) -> list[Path]:
    """Expert folders: `adapters` if given (same names, same order), else the first existing candidate."""
    if adapters is not None:
        pairs = normalize_expert_spec(adapters)
        if [n for n, _ in pairs] != names:
            raise ExpertError(
                f"{path}: the checkpoint's experts are {names} (in this order); "
                f"the adapters given are {[n for n, _ in pairs]}"
            )
        return [p for _, p in pairs]
    dirs = []
    root = path.resolve()
    for name, options in zip(names, candidates):
        inside = [p for p in options if p.resolve().is_relative_to(root)]
        found = next((p for p in inside if p.is_dir()), None)
        outside = next((p for p in options if p.is_dir() and p not in inside), None)
        if found is None and outside is not None:
            raise CheckpointError(
                f"{path}: adapter folder {outside.name}/ for expert {name!r} leads outside the checkpoint "
                f"(a symlink to {outside.resolve()}?); expert folders must be inside it, or pass adapters={{...}}"
            )
        if found is None:
            raise CheckpointError(
                f"{path}: adapter folder {options[0].name}/ for expert {name!r} is missing (expert folders "
                "must be inside the checkpoint; pass adapters={...} to load experts from elsewhere)"
            )
        adapter_files(found)  # no file of a checkpoint's expert may lead outside it
        dirs.append(found)
    return dirs


def read_native(path: Path, adapters: ExpertSpec | None = None) -> StoredCheckpoint:
    config, names, data = read_native_config(path)
    stored = data.get("adapters") if isinstance(data.get("adapters"), dict) else {}
    candidates = [[path / n] + [p for p in [stored_expert_path(path, stored.get(n))] if p is not None] for n in names]
    dirs = resolve_expert_dirs(path, names, candidates, adapters)
    clf_path = checkpoint_file(path, CLASSIFIER_NAME)
    if not clf_path.is_file():
        clf_path = checkpoint_file(path, CLASSIFIER_PT_NAME)
    if not clf_path.is_file():
        raise CheckpointError(f"{path}: no {CLASSIFIER_NAME} (or {CLASSIFIER_PT_NAME}); classifier weights missing")
    return StoredCheckpoint(
        config=config,
        names=names,
        expert_dirs=dirs,
        classifier=load_classifier_state(clf_path),
        classifier_path=clf_path,
        base_model_id=data.get("base_model_id"),
    )
