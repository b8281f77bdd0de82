"""Merged decoding: while every live row uses the same fixed scalings, fold the experts into the base
weights so a token costs what the base model costs; put the original weights back exactly afterwards.

Used by generation once the scalings stop changing (`reuse_scalings_after`, `static_scalings`) and
the batch shares them (batch 1, or a static mix). Never on quantized or tied weights, never with
gradients: those layers keep the fused path (`XLoraLinear` reads a None coefficient as "merged").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from xlora.core.classifier import select_topk

if TYPE_CHECKING:
    from xlora.core.model import XLoraModel


def mergeable(layer: nn.Module, shared: set[int]) -> bool:
    """A plain float `nn.Linear` whose weight no other module uses (a tied lm_head would change the
    embedding too) and that does not train."""
    base = getattr(layer, "base_layer", None)
    if type(base) is not nn.Linear:  # bitsandbytes and other quantized layers subclass or replace it
        return False
    w = base.weight
    return w.is_floating_point() and not w.requires_grad and w.data_ptr() not in shared


def _shared_storage(model: XLoraModel) -> set[int]:
    """Data pointers of weights used elsewhere: the input embedding (many models tie it to an adapted
    lm_head) and any weight two adapted layers share (merging would add both deltas to both)."""
    w = getattr(model.base.get_input_embeddings(), "weight", None)
    shared = set() if w is None else {w.data_ptr()}
    seen: set[int] = set()
    for layer in model.xlora_layers:
        ptr = getattr(getattr(layer.base_layer, "weight", None), "data_ptr", lambda: None)()
        if ptr is not None:
            (shared if ptr in seen else seen).add(ptr)
    return shared


def _merged_weight(w: torch.Tensor, b_scaled: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A new tensor `w + b_scaled @ a` (`[out, in]`); one fused GEMM when dtypes and devices agree,
    since the merge's GEMM is most of what merged decoding costs."""
    if b_scaled.dtype == w.dtype and b_scaled.device == w.device and w.is_contiguous():
        return torch.addmm(w, b_scaled, a)  # [out, R] x [R, in] accumulated onto w
    delta = b_scaled @ a  # [out, R] x [R, in], in the experts' dtype
    return (w + delta.to(w.device, w.dtype)).contiguous()


def row_scalings_if_shared(scalings: torch.Tensor) -> torch.Tensor | None:
    """`[b, L, N]` -> the one `[L, N]` every row uses, or None when rows differ."""
    first = scalings[0]
    return first if bool((scalings == first).all()) else None


@contextmanager
def merged_experts(model: XLoraModel, scalings: torch.Tensor) -> Iterator[None]:
    """Inside, the base weights include `sum_i s_i (alpha_i/r_i) B_i A_i` for the fixed `scalings`
    `[L, N]` (top-k applied here) and the model's coefficients are set so that merged layers add
    nothing and the others (quantized, tied) still add their experts. On exit every weight tensor is
    the original object again (exact, no subtraction)."""
    coef = model._coef(
        select_topk(scalings[None, None], model.config, model._expert_mask)
    )  # top-k before any cast, as fused
    shared = _shared_storage(model)
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    per_layer: list[torch.Tensor | None] | None = None  # None: global weight 0, the plain base model
    try:
        if coef is not None:
            per_layer = []
            with torch.no_grad():
                for layer, c in zip(model.xlora_layers, coef):
                    c = c.reshape(-1)  # [R_l]
                    if not mergeable(layer, shared):
                        per_layer.append(c)  # this layer keeps the fused path
                        continue
                    w = layer.base_layer.weight
                    saved.append((w, w.data))
                    w.data = _merged_weight(w.data, layer.lora_B * c.to(layer.lora_B.dtype), layer.lora_A)
                    per_layer.append(None)
        with model._coefficients(per_layer):
            model._merged = True
            try:
                yield
            finally:
                model._merged = False
    finally:
        for w, original in reversed(saved):
            w.data = original
