"""The fused layer equals a per-expert loop, and skips the expert math when scalings are zero."""

from __future__ import annotations

import torch
from torch import nn

from xlora.core.experts import LoraExpert, stack_module
from xlora.core.layers import ScalingsState, XLoraLinear


def random_experts(n_in: int, n_out: int, ranks: list[int], scales: list[float], skip: int | None = None):
    experts = []
    for i, (r, c) in enumerate(zip(ranks, scales)):
        e = LoraExpert(name=f"e{i}", path=None, adapter_config={})
        if i != skip:  # expert `skip` does not target this module
            e.weights["m"] = (torch.randn(r, n_in), torch.randn(n_out, r))
            e.scales["m"] = c
        experts.append(e)
    return experts


def loop_reference(base: nn.Linear, experts, x, s, g):
    """sum_i s_i * scale_i * B_i A_i x, one expert at a time (what PEFT does)."""
    y = base(x)
    for i, e in enumerate(experts):
        if "m" not in e.weights:
            continue
        a, b = e.weights["m"]
        y = y + (x * s[..., i : i + 1]) @ a.T @ b.T * e.scales["m"] * g
    return y


def test_fused_equals_loop():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    experts = random_experts(16, 24, ranks=[2, 5, 3, 1], scales=[2.0, 0.5, 1 / 3**0.5, 4.0], skip=2)
    layer = XLoraLinear(base, 0, stack_module("m", experts, torch.float32, "cpu"), ScalingsState())
    assert layer.rank == 2 + 5 + 1  # the expert without this module adds no rows
    x = torch.randn(3, 7, 16)
    s = torch.softmax(torch.randn(3, 7, 4), -1)
    got = layer.forward_with_scalings(x, s, global_weight=0.8)
    torch.testing.assert_close(got, loop_reference(base, experts, x, s, 0.8), atol=1e-5, rtol=1e-5)


def test_zero_scalings_skip_expert_math():
    """With no coefficients set the layer never touches the expert weights (NaN would show)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = XLoraLinear(
        base, 0, stack_module("m", random_experts(8, 8, [2, 2], [1.0, 1.0]), torch.float32, "cpu"), ScalingsState()
    )
    with torch.no_grad():
        layer.lora_A.fill_(float("nan"))
    x = torch.randn(2, 3, 8)
    assert torch.equal(layer(x), base(x))
    layer.state.coef = [torch.ones(layer.rank)]
    assert torch.isnan(layer(x)).all()
