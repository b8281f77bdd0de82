"""XLoraClassifier: maps the scaling pass's last hidden state to per-token expert scalings."""

from __future__ import annotations

import torch
from torch import nn

from xlora.core.config import XLoraConfig


def build_layers(config: XLoraConfig, hidden_size: int, n_out: int) -> nn.Sequential:
    """PEFT's layout: [Linear, ReLU, (Dropout)] * (depth-1), Linear; Dropout only when p > 0."""
    bias = config.use_bias
    layers: list[nn.Module] = []
    width = hidden_size
    for _ in range(config.xlora_depth - 1):
        layers.append(nn.Linear(width, config.xlora_size, bias=bias))
        if config.enable_relu_and_dropout:
            layers.append(nn.ReLU())
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
        width = config.xlora_size
    layers.append(nn.Linear(width, n_out, bias=bias))
    return nn.Sequential(*layers)


class XLoraClassifier(nn.Module):
    """Hidden states `[B, T, H]` -> scalings `[B, T, L, N]` (softmax over experts when enabled).

    Its state dict uses PEFT's keys (`layers.{i}.weight|bias`) so weights copy across unchanged.
    """

    def __init__(self, config: XLoraConfig, hidden_size: int, n_experts: int, n_layers: int) -> None:
        super().__init__()
        self.config = config
        self.n_experts = n_experts
        self.n_layers = n_layers
        n_out = n_experts * n_layers if config.layerwise_scalings else n_experts
        self.layers = build_layers(config, hidden_size, n_out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw classifier output reshaped to `[B, T, L, N]` (broadcast over L when not layerwise)."""
        b, t = hidden.shape[:2]
        out = self.layers(hidden.to(self.layers[0].weight.dtype))
        if not self.config.layerwise_scalings:
            return out.unsqueeze(2).expand(b, t, self.n_layers, self.n_experts)
        return out.reshape(b, t, self.n_layers, self.n_experts)

    def forward(self, hidden: torch.Tensor, expert_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalings `[B, T, L, N]`; experts where `expert_mask` `[N]` is False get weight 0."""
        logits = self.logits(hidden)
        if self.config.enable_softmax:
            if expert_mask is not None:
                logits = logits.masked_fill(~expert_mask, float("-inf"))
            return torch.softmax(logits / self.config.softmax_temperature, dim=-1)
        if expert_mask is not None:
            logits = logits.masked_fill(~expert_mask, 0.0)
        return logits


def select_topk(scalings: torch.Tensor, config: XLoraConfig, expert_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per module and token keep the top-k scalings; optionally re-normalise the kept non-zero ones.

    Matches PEFT: zero entries stay out of the softmax, so an all-zero row stays zero (not NaN).
    `expert_mask` `[N]` (False = masked out): a masked expert (scaling 0) never takes a top-k place
    from a kept one, even one with a negative scaling.
    """
    if config.top_k_lora is not None:
        ranked = scalings
        if expert_mask is not None:
            ranked = scalings.masked_fill(~expert_mask.to(scalings.device), float("-inf"))
        idx = torch.topk(ranked, k=config.top_k_lora, dim=-1).indices
        keep = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, idx, True)
        scalings = scalings * keep.to(scalings.dtype)
    if config.enable_softmax_topk:
        nonzero = scalings != 0
        soft = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1)
        scalings = soft.masked_fill(~nonzero, 0.0)
    return scalings
