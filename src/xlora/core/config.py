"""XLoraConfig: every option of the X-LoRA gate, validated at construction, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class XLoraConfigError(ValueError):
    """A configuration value or file is invalid; the message names the field and what was expected."""


# |global_scaling_weight| bound, for the library, the CLI and the server alike: 1 is the trained
# setting and 0 the base model. Ten times the experts' deltas is already far from anything the model
# was trained on; larger weights overflow the logits to inf/NaN (and would fail a whole server batch).
MAX_GLOBAL_SCALING_WEIGHT = 10.0


class WriteError(OSError):
    """Writing a file or folder failed (disk full, read-only); the message names the destination."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # ENOSPC, EROFS, ... of the failure underneath


class CheckpointError(ValueError):
    """A checkpoint directory is unusable (or a destination unwritable); the message names the file."""


@dataclass
class XLoraConfig:
    """Options of the X-LoRA classifier ("gate") and of how its scalings are applied.

    Field names and defaults follow PEFT's and the original package's `XLoraConfig` so that files
    written by either read back unchanged.
    """

    hidden_size: int | None = None  # inferred from the base model when None
    xlora_depth: int = 1
    xlora_size: int = 2048  # hidden width of the classifier; unused when depth == 1
    xlora_dropout_p: float = 0.2
    enable_relu_and_dropout: bool = True
    use_bias: bool = True
    layerwise_scalings: bool = False
    enable_softmax: bool = True
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    enable_softmax_topk: bool = False
    scaling_pass_value: float | None = 0.0  # None means 1/N
    global_scaling_weight: float = 1.0
    use_trainable_adapters: bool = False
    reuse_scalings_after: int | None = None  # generation: reuse scalings after this many new tokens
    # Early gate (not in PEFT / the original package): the scaling pass runs only the first k decoder
    # layers and the classifier reads layer k (through the final norm unless scaling_pass_norm=False).
    # None = all layers, the paper's and PEFT's numerics. Written to files only when set.
    scaling_pass_layers: int | None = None
    scaling_pass_norm: bool = True

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """Every assignment after construction is validated (the old value stays on error), so that
        `config.softmax_temperature = 0` fails at once, naming the field, instead of giving NaN
        scalings later. Change dependent fields together with `update`."""
        if not getattr(self, "_checked", False) or name not in _FIELD_NAMES:  # e.g. HF Trainer's use_cache
            object.__setattr__(self, name, value)
            return
        self.update(**{name: value})

    def update(self, **values: Any) -> None:
        """Set several fields at once, validated together; on error nothing changes."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise XLoraConfigError(f"XLoraConfig: unknown field(s) {', '.join(unknown)}")
        old = {name: getattr(self, name) for name in values}
        for name, value in values.items():
            object.__setattr__(self, name, value)
        try:
            self.validate(getattr(self, "_n_experts", None))
        except XLoraConfigError:
            for name, value in old.items():
                object.__setattr__(self, name, value)
            raise

    def bind_experts(self, n_experts: int) -> None:
        """Check this config against a model of `n_experts` and keep that bound for later assignments."""
        self.validate(n_experts)
        object.__setattr__(self, "_n_experts", n_experts)

    def validate(self, n_experts: int | None = None) -> None:
        """Raise XLoraConfigError naming the first invalid field; `n_experts` enables the top-k bound."""

        def fail(name: str, expected: str) -> None:
            raise XLoraConfigError(f"XLoraConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if self.hidden_size is not None and not (is_int(self.hidden_size) and self.hidden_size > 0):
            fail("hidden_size", "a positive integer or None")
        if not (is_int(self.xlora_depth) and self.xlora_depth >= 1):
            fail("xlora_depth", "an integer >= 1")
        if not (is_int(self.xlora_size) and self.xlora_size >= 1):
            fail("xlora_size", "an integer >= 1")
        if not (is_num(self.xlora_dropout_p) and 0.0 <= self.xlora_dropout_p < 1.0):
            fail("xlora_dropout_p", "a number in [0, 1)")
        for name in (
            "enable_relu_and_dropout",
            "use_bias",
            "layerwise_scalings",
            "enable_softmax",
            "enable_softmax_topk",
            "use_trainable_adapters",
        ):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")
        if not (is_num(self.softmax_temperature) and self.softmax_temperature > 0):
            fail("softmax_temperature", "a number > 0")
        if self.top_k_lora is not None:
            if not (is_int(self.top_k_lora) and self.top_k_lora >= 1):
                fail("top_k_lora", "an integer >= 1 or None")
            if n_experts is not None and self.top_k_lora > n_experts:
                fail("top_k_lora", f"at most the number of experts ({n_experts})")
        if self.enable_softmax_topk and self.top_k_lora is None:
            fail("enable_softmax_topk", "false unless top_k_lora is set")
        if self.scaling_pass_value is not None and not is_num(self.scaling_pass_value):
            fail("scaling_pass_value", "a number or None (None means 1/number of experts)")
        if not (is_num(self.global_scaling_weight) and abs(self.global_scaling_weight) <= MAX_GLOBAL_SCALING_WEIGHT):
            fail("global_scaling_weight", f"a finite number with magnitude <= {MAX_GLOBAL_SCALING_WEIGHT:g}")
        if self.reuse_scalings_after is not None and not (
            is_int(self.reuse_scalings_after) and self.reuse_scalings_after >= 1
        ):
            fail("reuse_scalings_after", "an integer >= 1 or None")
        if self.scaling_pass_layers is not None and not (
            is_int(self.scaling_pass_layers) and self.scaling_pass_layers >= 1
        ):
            fail("scaling_pass_layers", "an integer >= 1 (the first k decoder layers) or None (all layers)")
        if not isinstance(self.scaling_pass_norm, bool):
            fail("scaling_pass_norm", "true or false")

    def to_dict(self) -> dict[str, Any]:
        """All fields; the early-gate fields only when an early gate is set, so files of full-pass
        gates stay readable by PEFT and the original package (which do not know these fields)."""
        data = dataclasses.asdict(self)
        if self.scaling_pass_layers is None:
            del data["scaling_pass_layers"], data["scaling_pass_norm"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config", ignore: tuple[str, ...] = ()) -> XLoraConfig:
        """Build from a dict; keys listed in `ignore` are dropped, any other unknown key is an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known and k not in ignore)
        if unknown:
            raise XLoraConfigError(
                f"{source}: unknown X-LoRA config field(s) {', '.join(unknown)}; "
                f"expected only: {', '.join(sorted(known))}"
            )
        values = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**values)
        except XLoraConfigError as e:
            raise XLoraConfigError(f"{source}: {e}") from None

    def to_json_file(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
        """Write the config (plus `extra` fields such as expert names) atomically."""
        data = {**self.to_dict(), **(extra or {})}
        write_text_atomic(Path(path), json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], ignore: tuple[str, ...] = ()) -> XLoraConfig:
        data = read_json_object(Path(path))
        return cls.from_dict(data, source=str(path), ignore=ignore)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(XLoraConfig))


def read_json_object(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path` with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise XLoraConfigError(f"{path}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise XLoraConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise XLoraConfigError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise XLoraConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary sibling, then rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only: name the file, leave nothing half-written
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write it ({e.strerror or e})", e.errno) from None
