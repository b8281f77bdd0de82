"""A shorter scaling pass: run only the first k decoder layers and let the classifier read layer k.

The paper's scaling pass runs the whole decoder, so X-LoRA costs about 2x the base model per token.
With `XLoraConfig.scaling_pass_layers = k` the scaling pass stops after decoder layer k (its KV cache
fills k layers), so a token costs about (1 + k/L) x the base. The classifier reads layer k's output
through the model's final norm (`scaling_pass_norm=True`, the default) or raw.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from xlora.core.config import XLoraConfig, XLoraConfigError


def decoder_layer_list(decoder: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The decoder's stack of transformer blocks as (owner, attribute name, ModuleList).

    Looks for `layers` on the model's own decoder (`get_decoder()`: a vision-language model's language
    model, e.g. Idefics3's `text_model`), on the decoder or its `language_model` / `model`, then for
    any ModuleList outside a vision tower as long as the config's `num_hidden_layers`."""
    get_decoder = getattr(decoder, "get_decoder", None)
    try:
        inner = get_decoder() if callable(get_decoder) else None
    except Exception:  # noqa: BLE001 - exotic models raise here: fall back to the attribute search
        inner = None
    owners = [inner if isinstance(inner, nn.Module) else None, decoder]
    owners += [getattr(decoder, "language_model", None), getattr(decoder, "model", None)]
    for owner in owners:
        if owner is not None and isinstance(getattr(owner, "layers", None), nn.ModuleList):
            return owner, "layers", owner.layers
    config = getattr(decoder, "config", None)
    text = getattr(config, "text_config", None) or config
    n = getattr(text, "num_hidden_layers", None)
    for name, module in decoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name and not _in_vision_tower(name):
            parent_name, _, attr = name.rpartition(".")
            return decoder.get_submodule(parent_name) if parent_name else decoder, attr, module
    raise ValueError(
        f"XLoraConfig.scaling_pass_layers: cannot find the decoder layers of {type(decoder).__name__} "
        "(expected a `layers` ModuleList); use scaling_pass_layers=None (all layers)"
    )


def _in_vision_tower(name: str) -> bool:
    """A dotted module name inside a vision tower (`vision_model...`, `visual...`)."""
    return any(part.startswith(("vision", "visual")) for part in name.split("."))


def final_norm(owner: nn.Module) -> tuple[nn.Module, str] | None:
    """The final norm applied after the last block (`norm`, `final_layernorm`, `final_layer_norm`,
    `ln_f`), or None."""
    for attr in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
        if isinstance(getattr(owner, attr, None), nn.Module):
            return owner, attr
    return None


def n_decoder_layers(decoder: nn.Module) -> int:
    return len(decoder_layer_list(decoder)[2])


def check_scaling_pass_layers(config: XLoraConfig, base: nn.Module) -> None:
    """`scaling_pass_layers` must name 1..L decoder layers of this base."""
    k = config.scaling_pass_layers
    if k is None:
        return
    n = n_decoder_layers(base.base_model)
    if k > n:
        raise XLoraConfigError(
            f"XLoraConfig.scaling_pass_layers: expected 1..{n} (the base model's decoder layers), got {k}"
        )


@contextmanager
def truncated_decoder(decoder: nn.Module, k: int | None, norm: bool = True) -> Iterator[None]:
    """Inside, `decoder` runs only its first `k` blocks (None: all, nothing changes); with
    `norm=False` its final norm is skipped too, so the output is layer k's raw residual stream.

    Implemented by swapping the block list (and the norm) for the duration: every architecture loops
    over `self.layers[: num_hidden_layers]`, so a shorter list runs fewer blocks with no other change.
    """
    if k is None:
        yield
        return
    owner, attr, layers = decoder_layer_list(decoder)
    if not 1 <= k <= len(layers):
        raise ValueError(f"XLoraConfig.scaling_pass_layers: expected 1..{len(layers)} (the decoder's layers), got {k}")
    norm_slot = None if norm else final_norm(owner)
    if not norm and norm_slot is None:
        raise ValueError(
            f"XLoraConfig.scaling_pass_norm: cannot find the final norm of {type(owner).__name__} to skip "
            "(expected norm, final_layernorm, final_layer_norm or ln_f); use scaling_pass_norm=True"
        )
    saved_norm = getattr(*norm_slot) if norm_slot else None
    owner._modules[attr] = layers[:k]  # a new ModuleList of the same blocks
    if norm_slot:
        norm_slot[0]._modules[norm_slot[1]] = nn.Identity()
    try:
        yield
    finally:
        owner._modules[attr] = layers
        if norm_slot:
            norm_slot[0]._modules[norm_slot[1]] = saved_norm
