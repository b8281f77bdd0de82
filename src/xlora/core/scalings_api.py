"""The PEFT-named scalings API of XLoraModel: latest scalings, the scalings log, and the setters
that change one gate option with validation (a mixin: it uses only `config`, `scalings_log`,
`_latest_scalings`, `n_experts`, `expert_names` and `module_names` of the model)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from xlora.core.checks import check_number
from xlora.core.config import XLoraConfigError

if TYPE_CHECKING:
    from xlora.core.config import XLoraConfig
    from xlora.core.scalings_log import ScalingsLog


class ScalingsAPI:
    """Methods with PEFT's names and behaviour, shared by `XLoraModel`."""

    config: XLoraConfig
    scalings_log: ScalingsLog
    _latest_scalings: torch.Tensor | None
    n_experts: int
    expert_names: list[str]
    module_names: list[str]

    def _check_not_merged(self) -> None:  # XLoraModel's: refuses while a generation holds merged weights
        raise NotImplementedError

    def get_latest_scalings(self) -> torch.Tensor | None:
        """Scalings `[B, T, L, N]` of the latest classifier call (before top-k), or None."""
        return self._latest_scalings

    def enable_scalings_logging(self) -> None:
        self.scalings_log.enabled = True

    def disable_scalings_logging(self) -> None:
        """Stop logging without clearing the log."""
        self.scalings_log.enabled = False

    def clear_scalings_log(self) -> None:
        self.scalings_log.entries.clear()

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the list of logged scalings, each `[B, T, L, N]`."""
        return list(self.scalings_log.entries)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        return self.scalings_log.bucketed()

    def flush_log_scalings(self, path: str | os.PathLike[str]) -> Path:
        """Write the log to `<path>.npz` + `<path>-mapping.json` and clear it."""
        return self.scalings_log.flush(path, self.expert_names, self.module_names)

    def _set_config(self, method: str, field: str, value: object) -> None:
        """Set one config field, or leave the config untouched and raise a ValueError naming `method`
        (a RuntimeError while a generation holds merged weights built with the current value)."""
        self._check_not_merged()
        try:
            self.config.update(**{field: value})
        except XLoraConfigError as e:
            raise XLoraConfigError(f"{method}: {e}") from None

    def set_topk_lora(self, value: int | None) -> None:
        """Keep only the k largest scalings per token and module (None: all); 1 <= k <= n_experts."""
        check_number(
            "set_topk_lora",
            "value (XLoraConfig.top_k_lora)",
            value,
            integer=True,
            low=1,
            high=self.n_experts,
            optional=True,
            error=XLoraConfigError,
        )
        self._set_config("set_topk_lora", "top_k_lora", None if value is None else int(value))

    def set_global_scaling_weight(self, weight: float) -> None:
        """Multiply every expert's contribution by `weight` (a finite number; 1 = as trained)."""
        check_number(
            "set_global_scaling_weight", "weight (XLoraConfig.global_scaling_weight)", weight, error=XLoraConfigError
        )
        self._set_config("set_global_scaling_weight", "global_scaling_weight", float(weight))

    def get_global_scaling_weight(self) -> float:
        return self.config.global_scaling_weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        """Constant scalings of the scaling pass (a finite number); None means 1/N."""
        check_number(
            "set_scaling_pass_value",
            "value (XLoraConfig.scaling_pass_value)",
            value,
            optional=True,
            error=XLoraConfigError,
        )
        self._set_config("set_scaling_pass_value", "scaling_pass_value", None if value is None else float(value))
