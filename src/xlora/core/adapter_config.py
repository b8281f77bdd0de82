"""The checks of a PEFT `adapter_config.json` against itself and its tensors: field types and
ranges, `alpha_pattern` / `rank_pattern` (PEFT's per-module overrides, regexes matched with a time
limit), and `target_modules` / `exclude_modules` / `layers_to_transform` (which modules it adapts)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import regex

# A module-name regex from a file gets this long to match one name: a pattern such as "(.|.)*Z"
# backtracks exponentially and would hang the loader (checked with the `regex` module's timeout).
PATTERN_TIMEOUT_S = 0.5
MAX_PATTERN_CHARS = 500


class ExpertError(ValueError):
    """An expert adapter is unusable; the message names the expert, the file and the problem."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_adapter_config(cfg: dict, cfg_path: Path, name: str) -> None:
    """Types and ranges of every adapter_config.json field we read, so that a bad value is an
    ExpertError naming the file and field instead of a TypeError or re.error deep in loading."""

    def fail(field: str, expected: str, got: object) -> None:
        raise ExpertError(f"expert {name!r}: {cfg_path}: field {field!r}: expected {expected}, got {got!r}")

    for flag in ("use_dora", "use_rslora", "lora_bias"):
        if cfg.get(flag) is not None and not isinstance(cfg[flag], bool):
            fail(flag, "true or false", cfg[flag])
    if not isinstance(cfg.get("bias", "none"), str):
        fail("bias", "'none'", cfg["bias"])
    if "lora_alpha" in cfg and not (_is_number(cfg["lora_alpha"]) and cfg["lora_alpha"] > 0):
        fail("lora_alpha", "a finite number > 0", cfg["lora_alpha"])
    if "r" in cfg and not _is_positive_int(cfg["r"]):
        fail("r", "an integer >= 1", cfg["r"])
    if cfg.get("layer_replication"):
        fail(
            "layer_replication", "null (replicated layers change the base model's structure)", cfg["layer_replication"]
        )
    patterns = (("alpha_pattern", "a finite number > 0"), ("rank_pattern", "an integer >= 1"))
    for field_name, expected in patterns:
        pattern = cfg.get(field_name)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            fail(field_name, "an object {module regex: value}", pattern)
        for key, value in pattern.items():
            if len(key) > MAX_PATTERN_CHARS:
                fail(field_name, f"module name regexes of at most {MAX_PATTERN_CHARS} characters", key[:40] + "...")
            try:
                regex.compile(key)
            except regex.error as e:
                fail(field_name, f"module name regexes (key {key!r}: {e})", pattern)
            ok = _is_positive_int(value) if field_name == "rank_pattern" else _is_number(value) and value > 0
            if not ok:
                fail(f"{field_name}[{key!r}]", expected, value)


def _pattern_value(module: str, pattern: dict | None, where: str) -> tuple[str, object] | None:
    """PEFT's per-module override: the first key whose regex matches a dotted suffix of the name.

    Matched with a time limit: a pathological pattern is an error, not a hang."""
    for key, value in (pattern or {}).items():
        try:
            hit = regex.fullmatch(rf"(.*\.)?(?:{key})", module, timeout=PATTERN_TIMEOUT_S)
        except TimeoutError:
            raise ExpertError(
                f"{where}: regex {key!r} takes over {PATTERN_TIMEOUT_S} s to match {module!r} "
                "(catastrophic backtracking); use a plain module-name pattern"
            ) from None
        if hit:
            return key, value
    return None


def _targeted(module: str, targets: object, field: str, where: str) -> bool:
    """PEFT's rule: a string is a regex over the whole module name, a list holds name suffixes."""
    if isinstance(targets, str):
        try:
            return regex.fullmatch(targets, module, timeout=PATTERN_TIMEOUT_S) is not None
        except TimeoutError:
            raise ExpertError(f"{where}: field {field!r}: regex takes over {PATTERN_TIMEOUT_S} s to match") from None
        except regex.error as e:
            raise ExpertError(f"{where}: field {field!r}: not a valid regex ({e})") from None
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        return any(module == t or module.endswith("." + t) for t in targets)
    raise ExpertError(f"{where}: field {field!r}: expected a regex string or a list of module names, got {targets!r}")


def _layer_index(module: str, pattern: object) -> int | None:
    """The decoder layer number in a module name (`...layers.3.self_attn...` -> 3), as PEFT finds it."""
    names = [pattern] if isinstance(pattern, str) else list(pattern) if isinstance(pattern, list) else []
    alternatives = "|".join(re.escape(n) for n in names) or r"[^.]+"
    m = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", module)
    return int(m.group(1)) if m else None


def check_targets(cfg: dict, modules: list[str], cfg_path: Path, file: Path, name: str) -> None:
    """Every module with tensors must be one the config targets: PEFT adapts the targets and drops
    other tensors (with a warning), so a disagreement means the file is not what it says it is."""
    where = f"expert {name!r}: {cfg_path}"
    targets, excluded = cfg.get("target_modules"), cfg.get("exclude_modules")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise ExpertError(
            f"{where}: field 'layers_to_transform': expected an integer or a list of them, got {layers!r}"
        )
    for module in modules:
        problem = None
        if targets not in (None, "all-linear") and not _targeted(module, targets, "target_modules", where):
            problem = f"is not matched by field 'target_modules' {targets!r}"
        elif excluded and _targeted(module, excluded, "exclude_modules", where):
            problem = f"is excluded by field 'exclude_modules' {excluded!r}"
        elif layers and _layer_index(module, cfg.get("layers_pattern")) not in layers:
            problem = f"is outside field 'layers_to_transform' {layers}"
        if problem:
            raise ExpertError(
                f"{where}: module {module} has LoRA tensors in {file} but {problem}; PEFT would drop "
                "those tensors, so the config and the weights disagree (fix target_modules or retrain)"
            )


def alpha_for(module: str, cfg: dict, where: str = "alpha_pattern") -> float:
    """PEFT's per-module alpha: the first `alpha_pattern` key matching the module name's suffix."""
    hit = _pattern_value(module, cfg.get("alpha_pattern"), where)
    return float(hit[1] if hit else cfg.get("lora_alpha", 8))


def check_rank(module: str, rank: int, cfg: dict, cfg_path: Path, name: str) -> None:
    """The tensors' rank must be the one the config declares (`rank_pattern`, else `r`), as PEFT requires."""
    hit = _pattern_value(module, cfg.get("rank_pattern"), f"expert {name!r}: {cfg_path}: field 'rank_pattern'")
    field_name, declared = (f"rank_pattern[{hit[0]!r}]", hit[1]) if hit else ("r", cfg.get("r"))
    if declared is not None and declared != rank:
        raise ExpertError(
            f"expert {name!r}: module {module} has LoRA rank {rank} in its tensors but {cfg_path} "
            f"field {field_name!r} says {declared}"
        )
