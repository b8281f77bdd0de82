"""Describe a checkpoint or adapter directory without loading a base model (for `xlora info`)."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from xlora.core.config import CheckpointError, read_json_object
from xlora.core.experts import _KEY_RE, ExpertError, read_expert
from xlora.formats.checkpoint import detect_format, read_checkpoint
from xlora.formats.native import CONFIG_NAME, check_classifier, checkpoint_file, read_native_config


def layout_of(path: Path) -> str | None:
    """'native' or 'peft' for an X-LoRA checkpoint, None for a plain PEFT adapter; errors of
    `detect_format` (a symlink out, a missing folder) are raised, as loading raises them."""
    if path.is_file():
        raise CheckpointError(f"{path}: is a file; expected an X-LoRA checkpoint or a PEFT adapter directory")
    native = checkpoint_file(path, CONFIG_NAME)
    adapter = checkpoint_file(path, "adapter_config.json", "adapter")
    if not native.exists() and not adapter.exists():
        raise FileNotFoundError(f"{path}: neither an X-LoRA checkpoint ({CONFIG_NAME}) nor a PEFT adapter directory")
    if not native.exists() and str(read_json_object(adapter).get("peft_type", "LORA")).upper() != "XLORA":
        return None
    return detect_format(path)


def _adapter_summary(name: str, folder: Path) -> dict[str, str | int]:
    """One expert's row: ranks, alpha, rsLoRA, module count and targets (files read via `checkpoint_file`)."""
    cfg = read_json_object(checkpoint_file(folder, "adapter_config.json", "adapter"))
    ranks: set[int] = set()
    modules: set[str] = set()
    st = checkpoint_file(folder, "adapter_model.safetensors", "adapter")
    if st.is_file():
        try:
            with safe_open(str(st), framework="pt") as f:
                for key in f.keys():
                    m = _KEY_RE.match(key)
                    if m and m["ab"] == "A":
                        modules.add(m["module"])
                        ranks.add(f.get_slice(key).get_shape()[0])
        except (SafetensorError, OSError) as e:
            raise ExpertError(f"expert {name!r}: {st} is not a readable safetensors file ({e})") from None
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules}) or cfg.get("target_modules") or []
    return {
        "name": name,
        "rank": "/".join(str(r) for r in sorted(ranks)) or str(cfg.get("r")),
        "alpha": str(cfg.get("lora_alpha")),
        "rslora": "yes" if cfg.get("use_rslora") else "no",
        "modules": len(modules),
        "targets": ",".join(targets) if isinstance(targets, list) else str(targets),
    }


def verify(path: Path, single_adapter: bool) -> None:
    """Run every check loading runs that needs no base model: the config, the classifier's tensors
    (names, shapes, finiteness) and each expert's config and tensors; raise the loader's own error."""
    if single_adapter:
        read_expert(path.name, path)
        return
    stored = read_checkpoint(path)
    experts = [read_expert(name, folder) for name, folder in zip(stored.names, stored.expert_dirs)]
    modules = set().union(*(e.modules for e in experts))
    if stored.config.hidden_size is not None:  # else the classifier's shape is only known from a base
        check_classifier(
            stored.classifier, stored.config, len(experts), len(modules), stored.classifier_path, stored.missing_hint
        )


def describe(path: Path) -> tuple[dict | None, list[dict]]:
    """(gate config or None, one summary per expert) for a checkpoint or a single adapter dir, after
    `verify`: `xlora info` says what loading would refuse instead of showing a broken checkpoint."""
    path = Path(path)
    verify(path, single_adapter=layout_of(path) is None)
    if checkpoint_file(path, CONFIG_NAME).is_file():
        config, names, data = read_native_config(path)
        experts = []
        for name in names:  # names are checked by read_native_config: no separators, no ".."
            folder = path / name
            if not folder.is_dir():
                raise ExpertError(f"{path}: adapter folder {name}/ is missing")
            if not folder.resolve().is_relative_to(path.resolve()):
                raise ExpertError(f"{path}: adapter folder {name}/ leads outside the checkpoint (a symlink?)")
            experts.append(_adapter_summary(name, folder))
        summary = config.to_dict()
        summary["base_model_id"] = data.get("base_model_id")
        return summary, experts
    if checkpoint_file(path, "adapter_config.json", "adapter").is_file():
        return None, [_adapter_summary(path.name, path)]
    raise FileNotFoundError(f"{path}: neither an X-LoRA checkpoint ({CONFIG_NAME}) nor a PEFT adapter directory")
