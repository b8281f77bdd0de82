"""XLoraLinear: a base linear layer plus all experts of that module, applied in two GEMMs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xlora.core.experts import StackedExperts


def compute_dtype(module: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The float dtype a base linear computes in: its weight's, or for a quantized weight (int8/uint8
    storage: bitsandbytes 8-bit and 4-bit) its `compute_dtype` if set, else `fallback` (the model's)."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    declared = getattr(module, "compute_dtype", None)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        return declared
    return fallback


class ScalingsState:
    """Per-pass expert coefficients shared by all X-LoRA layers of one model.

    `coef` is None when the expert math must be skipped (scaling pass with value 0, disabled
    experts); otherwise it holds one tensor per adapted layer with, for every stacked rank row,
    the product scaling * alpha/r * global weight: `[B, T, R_l]` or a broadcastable `[R_l]`;
    None for a layer whose experts are merged into its base weight.
    (Separate tensors from one `split`, not slices of one: the backward of 56 slices would
    allocate 56 zero-filled copies of the whole coefficient tensor.)
    """

    def __init__(self) -> None:
        self.coef: Sequence[torch.Tensor | None] | None = None


class XLoraLinear(nn.Module):
    """`W x + sum_i s_i * (alpha_i / r_i) * B_i A_i x` with the experts stacked: two GEMMs for any N."""

    def __init__(
        self,
        base_layer: nn.Module,
        index: int,
        stacked: StackedExperts,
        state: ScalingsState,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index  # adapted-module number l
        self.lora_A = nn.Parameter(stacked.lora_A, requires_grad=trainable)  # [R, in]
        self.lora_B = nn.Parameter(stacked.lora_B, requires_grad=trainable)  # [out, R]
        self.register_buffer("row_expert", stacked.row_expert, persistent=False)  # [R]
        self.register_buffer("row_scale", stacked.row_scale, persistent=False)  # [R]
        self.state = state
        # only a plain Linear / GPT-2 Conv1D is known to return a fresh tensor safe to add into
        self._fresh_output = type(base_layer) is nn.Linear or type(base_layer).__name__ == "Conv1D"

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        coef = self.state.coef
        if coef is None:  # scalings known to be zero: plain base layer
            return y
        c = coef[self.index]
        if c is None:  # this layer's experts are merged into its base weight (merge.py)
            return y
        if c.device != x.device:  # model sharded over devices (device_map="auto")
            c = c.to(x.device)
        if c.dim() == 3 and x.dim() == 3 and c.shape[1] != x.shape[1]:
            # an adapted lm_head under `logits_to_keep=k` sees only the last k positions
            c = c[:, -x.shape[1] :]  # [B, k, R]
        delta = self._delta(x, c).to(y.dtype)
        if self._fresh_output:
            # in place: nothing saved for backward refers to `y` (Linear keeps its input and weight)
            return y.add_(delta)
        # quantized layers (bitsandbytes) may return a view made inside their autograd Function,
        # which autograd refuses to modify in place in grad mode: add out of place
        return y + delta

    def _delta(self, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A) * coef.to(self.lora_A.dtype)  # [B, T, R]
        return F.linear(h, self.lora_B)  # [B, T, out]

    def forward_with_scalings(
        self, x: torch.Tensor, scalings: torch.Tensor, global_weight: float = 1.0
    ) -> torch.Tensor:
        """Standalone use: `scalings` `[B, T, N]` are this module's per-expert weights."""
        coef = scalings.index_select(-1, self.row_expert) * self.row_scale * global_weight  # [B, T, R]
        return self.base_layer(x) + self._delta(x, coef).to(x.dtype)

    def extra_repr(self) -> str:
        return f"index={self.index}, rank={self.rank}"
