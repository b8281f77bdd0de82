"""Read PEFT LoRA adapter directories, check them against the base model, stack them per module.

We read the adapter files ourselves (config JSON + tensors) instead of going through PEFT's
injection machinery: that keeps loading cheap, lets every expert keep its own rank, alpha and
targets, and lets us reject what X-LoRA cannot run (DoRA, `modules_to_save`, ...) with a clear
message before anything is built.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from xlora.core.adapter_config import (
    ExpertError,
    alpha_for,
    check_adapter_config,
    check_rank,
    check_targets,
)
from xlora.core.checks import load_tensors_only
from xlora.core.config import XLoraConfigError, read_json_object
from xlora.core.multimodal import modules_outside_language_model, outside_error_message

ExpertSpec = Mapping[str, "str | Path"] | Iterable[tuple[str, "str | Path"]]

# base_model.model.<module>.lora_A[.<adapter name>].weight
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# base_model.model.<module>.base_layer.weight: PEFT's full copy of a targeted lm_head/embedding
_BASE_COPY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.base_layer\.weight$")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@ -]*")  # used with fullmatch: no trailing newline
# |alpha / r| above this is no LoRA anyone trained: it only turns every logit into 0 or inf.
MAX_SCALE = 1e4
# Bound on how far an expert can move one weight entry: |scale * (B @ A)_ij| <= scale * r * max|B| * max|A|.
# A trained LoRA moves weights by well under 1 (base weights are O(0.01-1)); 1e4 is far beyond any
# fine-tune, and finite factors beyond it (a corrupt or hostile file) turn the logits into inf/NaN.
MAX_DELTA = 1e4


@dataclass
class LoraExpert:
    """One PEFT LoRA adapter: per targeted module its A [r, in], B [out, r] and scale."""

    name: str
    path: Path
    adapter_config: dict
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    # full weights PEFT saved for some targets (save_embedding_layers); must equal the base's
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)
    weights_file: Path | None = None  # the adapter_model.safetensors / .bin it was read from

    @property
    def modules(self) -> list[str]:
        return list(self.weights)

    def rank(self, module: str) -> int:
        return self.weights[module][0].shape[0]


def check_expert_name(name: object, source: str | Path | None = None) -> str:
    """The one check every expert name passes before a path is built from it (names become folders).

    Letters, digits and `_.-+=@ ` only, not starting with a dot: no separators, no `..`, no hidden
    or absolute names, so `<dir> / name` always stays inside `<dir>`.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > 200:
        where = f"{source}: " if source else ""
        raise ExpertError(
            f"{where}expert name {name!r}: expected 1-200 letters, digits and _.-+=@ or spaces, not starting "
            "with a dot (it becomes a folder name)"
        )
    return name


def inside(root: Path, candidate: Path, what: str) -> Path:
    """`candidate` resolved, refusing anything (via `..` or symlinks) that leaves `root`."""
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ExpertError(f"{root}: {what} {str(candidate)!r} points outside the directory ({resolved})")
    return resolved


def normalize_expert_spec(experts: ExpertSpec) -> list[tuple[str, Path]]:
    """Turn a dict or a list of (name, path) pairs into checked (name, Path) pairs."""
    form = "experts: expected {name: adapter directory} or (name, adapter directory) pairs"
    if isinstance(experts, (str, os.PathLike)):
        raise ExpertError(f"{form}, got the path {str(experts)!r} alone; name it, e.g. {{'chem': {str(experts)!r}}}")
    if not isinstance(experts, (Mapping, Iterable)):
        raise ExpertError(f"{form}, got {type(experts).__name__}")
    if not isinstance(experts, Mapping) and any(
        isinstance(p, (str, os.PathLike)) or not isinstance(p, Iterable) for p in experts
    ):
        raise ExpertError(f"{form}, got a list of {type(next(iter(experts))).__name__} (name each adapter)")
    pairs = list(experts.items()) if isinstance(experts, Mapping) else [tuple(p) for p in experts]
    if not pairs:
        raise ExpertError("no experts given: X-LoRA needs at least one LoRA adapter directory")
    seen: set[str] = set()
    out = []
    for item in pairs:
        if len(item) != 2:
            raise ExpertError(f"expert entry {item!r}: expected (name, adapter directory)")
        name, path = item
        check_expert_name(name)
        if name in seen:
            raise ExpertError(f"expert name {name!r} is given twice; names must be unique")
        seen.add(name)
        out.append((name, Path(path)))
    return out


def _read_tensor_file(path: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file, tensors) of the adapter; a corrupt or truncated file is an ExpertError naming it."""
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        try:
            return st, load_file(str(st))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... all mean "unreadable file"
            raise ExpertError(
                f"expert {name!r}: cannot read {st} as safetensors (corrupt or truncated file?): {e}"
            ) from None
    if binf.is_file():
        try:
            data = load_tensors_only(binf)
        except ValueError as e:
            raise ExpertError(f"expert {name!r}: {e}") from None
        if not isinstance(data, dict):
            raise ExpertError(f"expert {name!r}: {binf} is not a state dict")
        return binf, data
    raise ExpertError(
        f"expert {name!r}: {path} has no adapter_model.safetensors or adapter_model.bin "
        "(expected a PEFT LoRA adapter directory)"
    )


def _load_tensors(path: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter's tensors, each checked to be a finite floating-point tensor (NaN/inf refused here,
    because they would turn every logit into NaN without any other sign)."""
    file, tensors = _read_tensor_file(path, name)
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ExpertError(f"expert {name!r}: {file}: entry {key!r} is not a named tensor")
        if not value.is_floating_point():
            raise ExpertError(f"expert {name!r}: {file}: tensor {key} has dtype {value.dtype}; expected floats")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ExpertError(
                f"expert {name!r}: {file}: tensor {key} has {bad} non-finite value(s) (NaN or inf); "
                "the adapter is broken (diverged training?)"
            )
    return file, tensors


def _check_unsupported_keys(tensors: dict[str, torch.Tensor], file: Path, name: str) -> None:
    """Refuse what PEFT can save but X-LoRA cannot mix, before any key is parsed as a LoRA weight."""
    for key in tensors:
        if "lora_embedding" in key:
            module = key.split(".lora_embedding")[0].removeprefix("base_model.model.")
            raise ExpertError(
                f"expert {name!r}: {file}: tensor {key} adapts the embedding {module}; embedding adapters "
                "are not supported (only Linear layers), retrain the expert without it in target_modules"
            )
        if "modules_to_save" in key:
            raise ExpertError(f"expert {name!r}: {file}: tensor {key} belongs to modules_to_save (not supported)")
        if "lora_magnitude_vector" in key:
            raise ExpertError(f"expert {name!r}: {file}: tensor {key} is a DoRA magnitude (DoRA is not supported)")


def read_expert(name: str, path: str | Path) -> LoraExpert:
    """Read one PEFT LoRA adapter directory; reject what X-LoRA cannot run."""
    path = Path(path)
    if not path.is_dir():
        raise ExpertError(f"expert {name!r}: adapter directory {path} does not exist")
    cfg_path = path / "adapter_config.json"
    try:
        cfg = read_json_object(cfg_path)
    except (FileNotFoundError, XLoraConfigError) as e:
        raise ExpertError(f"expert {name!r}: {e}") from None
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ExpertError(f"expert {name!r}: {cfg_path} has peft_type {peft_type!r}; expected 'LORA'")
    check_adapter_config(cfg, cfg_path, name)
    if cfg.get("use_dora"):
        raise ExpertError(f"expert {name!r}: DoRA adapters (use_dora=true in {cfg_path}) are not supported")
    if cfg.get("modules_to_save"):
        raise ExpertError(
            f"expert {name!r}: {cfg_path} has modules_to_save={cfg['modules_to_save']}; fully trained "
            "modules cannot be mixed per token, retrain the expert without modules_to_save"
        )
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise ExpertError(f"expert {name!r}: {cfg_path} trains biases; only bias='none' LoRA is supported")

    file, tensors = _load_tensors(path, name)
    _check_unsupported_keys(tensors, file, name)
    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    base_copies: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = _KEY_RE.match(key)
        if m is not None:
            parts = a_parts if m["ab"] == "A" else b_parts
            if m["module"] in parts:  # e.g. lora_A.weight and lora_A.default.weight: which one is meant?
                raise ExpertError(f"expert {name!r}: {file} holds two lora_{m['ab']} tensors for {m['module']}")
            parts[m["module"]] = value
            continue
        copy = _BASE_COPY_RE.match(key)
        if copy is None:
            raise ExpertError(f"expert {name!r}: unexpected tensor {key} in {file} (not a LoRA A/B weight)")
        base_copies[copy["module"]] = value
    if not a_parts:
        raise ExpertError(f"expert {name!r}: {file} holds no LoRA weights")

    expert = LoraExpert(name=name, path=path, adapter_config=cfg, base_copies=base_copies, weights_file=file)
    for module, a in a_parts.items():
        b = b_parts.get(module)
        if b is None:
            raise ExpertError(f"expert {name!r}: module {module} has lora_A but no lora_B in {file}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ExpertError(
                f"expert {name!r}: module {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                f"in {file}; expected [r, in] and [out, r]"
            )
        r = a.shape[0]
        if r == 0:
            raise ExpertError(f"expert {name!r}: module {module} has rank 0 in {file} (lora_A {tuple(a.shape)})")
        check_rank(module, r, cfg, cfg_path, name)
        alpha = alpha_for(module, cfg, f"expert {name!r}: {cfg_path}: field 'alpha_pattern'")
        expert.scales[module] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if expert.scales[module] > MAX_SCALE:
            raise ExpertError(
                f"expert {name!r}: {cfg_path}: lora_alpha {alpha} over rank {r} scales module {module} by "
                f"{expert.scales[module]:.3g}; expected at most {MAX_SCALE:g} (a corrupt or hostile config?)"
            )
        _check_delta(module, a, b, expert.scales[module], file, name)
        expert.weights[module] = (a, b)
    extra_b = set(b_parts) - set(a_parts)
    if extra_b:
        raise ExpertError(f"expert {name!r}: module {sorted(extra_b)[0]} has lora_B but no lora_A in {file}")
    check_targets(cfg, expert.modules, cfg_path, file, name)
    return expert


def _check_delta(module: str, a: torch.Tensor, b: torch.Tensor, scale: float, file: Path, name: str) -> None:
    """Refuse factors that can move a weight entry by more than MAX_DELTA (cheap bound, no B @ A)."""
    bound = scale * a.shape[0] * float(a.abs().max()) * float(b.abs().max())
    if not bound <= MAX_DELTA:  # also catches an overflow to inf
        raise ExpertError(
            f"expert {name!r}: {file}: module {module}: its LoRA factors can change a weight by up to "
            f"{bound:.3g} (scale x rank x max|lora_A| x max|lora_B|); expected at most {MAX_DELTA:g}, "
            "far beyond any trained adapter (a corrupt file?)"
        )


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2:
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores [in, out]
    return None


def check_experts(base: nn.Module, experts: list[LoraExpert]) -> list[str]:
    """Check every expert against the base model; return adapted module names in `named_modules` order."""
    modules = dict(base.named_modules())
    arch = getattr(getattr(base, "config", None), "model_type", None)
    targeted: set[str] = set()
    for expert in experts:
        for module, (a, b) in expert.weights.items():
            target = modules.get(module)
            if target is None:
                hint = f" (base model type {arch!r}; was the adapter trained on another architecture?)"
                raise ExpertError(
                    f"expert {expert.name!r}: target module {module} does not exist in the base model"
                    + (hint if arch else "")
                )
            if type(target).__name__ == "XLoraLinear" or hasattr(target, "base_layer"):
                raise ExpertError(
                    f"the base model already carries X-LoRA or LoRA layers ({module} is a {type(target).__name__}): "
                    "building an XLoraModel changes its base in place; call `.unload()` on that model to get the "
                    "plain base back, or load a fresh base model"
                )
            shape = linear_shape(target)
            if shape is None:
                raise ExpertError(
                    f"expert {expert.name!r}: target module {module} is a {type(target).__name__}; "
                    "only nn.Linear (and GPT-2 Conv1D) modules can be adapted"
                )
            n_in, n_out = shape
            if a.shape[1] != n_in or b.shape[0] != n_out:
                raise ExpertError(
                    f"expert {expert.name!r}: module {module} expects input {n_in} and output {n_out}, "
                    f"the adapter has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                    "(adapter made for a model with another hidden size?)"
                )
            targeted.add(module)
        for module, copy in expert.base_copies.items():
            _check_base_copy(expert, module, copy, modules.get(module))
        outside = modules_outside_language_model(base, list(expert.weights))  # VLM: vision tower, projector
        if outside:
            raise ExpertError(outside_error_message(base, expert.name, outside))
    return [name for name, _ in base.named_modules() if name in targeted]


def _check_base_copy(expert: LoraExpert, module: str, copy: torch.Tensor, target: nn.Module | None) -> None:
    """PEFT saves a full copy of a targeted lm_head (`save_embedding_layers`). We always use the base
    model's own weight, so the copy must equal it; a different one (resized vocabulary, retrained
    head) would be silently ignored otherwise."""
    where = f"expert {expert.name!r}: {expert.weights_file or expert.path}: tensor {module}.base_layer.weight"
    if module not in expert.weights:
        raise ExpertError(f"{where} is a full weight copy without LoRA weights for {module}; not supported")
    weight = getattr(target, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != copy.shape:
        shape = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
        raise ExpertError(
            f"{where} has shape {tuple(copy.shape)}, the base model's weight {shape} "
            "(resized vocabulary?); adapters that replace base weights are not supported"
        )
    if weight.is_meta:
        return  # module tree only (export-ordering): nothing to compare
    # compare in the coarser of the two dtypes: a bf16 base and its fp32 copy are the same weights
    dtype = max(copy.dtype, weight.dtype, key=lambda d: torch.finfo(d).eps)
    if not torch.equal(copy.to(dtype), weight.detach().to(device="cpu", dtype=dtype)):
        raise ExpertError(
            f"{where} differs from the base model's weight (adapter made for another base model, or "
            "a retrained lm_head); adapters that replace base weights are not supported"
        )


@dataclass
class StackedExperts:
    """All experts of one module stacked along the rank axis (DESIGN.md, fused expert math)."""

    lora_A: torch.Tensor  # [R, in]
    lora_B: torch.Tensor  # [out, R]
    row_expert: torch.Tensor  # [R] long: which expert each rank row belongs to
    row_scale: torch.Tensor  # [R]: alpha_i / r_i (or / sqrt(r_i)) of that expert


def stack_module(module: str, experts: list[LoraExpert], dtype: torch.dtype, device) -> StackedExperts:
    """Stack the experts that target `module`; experts that do not target it contribute no rows."""
    a_list, b_list, rows, scales = [], [], [], []
    for i, expert in enumerate(experts):
        if module not in expert.weights:
            continue
        a, b = expert.weights[module]
        a_list.append(a)
        b_list.append(b)
        rows.append(torch.full((a.shape[0],), i, dtype=torch.long))
        scales.append(torch.full((a.shape[0],), expert.scales[module], dtype=torch.float64))
    return StackedExperts(
        lora_A=torch.cat(a_list, 0).to(device=device, dtype=dtype),
        lora_B=torch.cat(b_list, 1).to(device=device, dtype=dtype),
        row_expert=torch.cat(rows).to(device),
        row_scale=torch.cat(scales).to(device=device, dtype=dtype),
    )


def load_experts(base: nn.Module, spec: ExpertSpec) -> tuple[list[LoraExpert], list[str]]:
    """Read and check all experts; return them and the adapted module names (the layer numbering)."""
    experts = [read_expert(name, path) for name, path in normalize_expert_spec(spec)]
    return experts, check_experts(base, experts)
