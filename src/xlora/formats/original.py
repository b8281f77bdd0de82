"""Drop-in functions for code written against the original `xlora` package.

    import xlora
    model = xlora.add_xlora_to_model(model, xlora.xLoRAConfig(hidden_size=..., base_model_id=..., device=...,
                                                                adapters={"a": "path"}, ...))
    model = xlora.from_pretrained("dir", model, "cpu")

Differences from the original (documented in the README): the returned object is our
`XLoraModel` (a `torch.nn.Module` with the original's scalings methods, not a `PeftModel`);
`device` only moves the model when given to `from_pretrained`; there is no hub download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from xlora.core.config import XLoraConfig
from xlora.core.model import XLoraModel


@dataclass
class xLoRAConfig:  # noqa: N801 - the original package's class name
    """The original package's config: gate options plus `hidden_size`, `base_model_id`, `device`, `adapters`."""

    hidden_size: int
    base_model_id: str
    device: Any = None
    adapters: dict[str, str] = field(default_factory=dict)
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    enable_relu_and_dropout: bool = True
    use_bias: bool = True
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def to_xlora_config(self) -> XLoraConfig:
        ours = {f.name for f in fields(XLoraConfig)}
        return XLoraConfig(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in ours})


def add_xlora_to_model(model: nn.Module, xlora_config: xLoRAConfig, verbose: bool = False, **_: Any) -> XLoraModel:
    """Original API: wrap `model` with the experts in `xlora_config.adapters` and a new classifier."""
    if not xlora_config.adapters:
        raise ValueError("xLoRAConfig.adapters: expected a mapping of expert names to adapter directories")
    result = XLoraModel.from_experts(
        model, xlora_config.adapters, xlora_config.to_xlora_config(), base_model_id=xlora_config.base_model_id
    )
    if verbose:
        print(f"X-LoRA: {result.n_experts} experts over {result.n_layers} adapted modules")
    return result


def from_pretrained(
    load_directory: str | os.PathLike[str],
    model: nn.Module,
    device: str | torch.device | None = None,
    adapters: dict[str, str] | None = None,
    verbose: bool = False,
    **_: Any,
) -> XLoraModel:
    """Original API: load a saved X-LoRA checkpoint onto `model` (and move it to `device`)."""
    result = XLoraModel.from_pretrained(model, load_directory, adapters=adapters)
    if device is not None:
        result.to(device)
    if verbose:
        print(f"X-LoRA loaded from {load_directory}: experts {result.expert_names}")
    return result
