"""Several mixtures over one base in memory: a structural copy of a base model that shares every
weight's storage with the original, so each X-LoRA mixture wraps its own module tree (its own
`XLoraLinear` layers, experts and classifier) while the base weights exist once.

Each floating-point weight gets its own `nn.Parameter` object over the same storage: merged
decoding (`xlora.core.merge`) rebinds a parameter's `.data` to a new merged tensor and back, which
then touches only the mixture that merged, never the others. Quantized weights (bitsandbytes
parameter subclasses, never merged) and buffers are shared as the same objects.
"""

from __future__ import annotations

import copy

from torch import nn


def shared_copy(base: nn.Module) -> nn.Module:
    """A copy of `base` whose parameters and buffers share storage with it (no weight is copied).

    Call it on the plain base, before any mixture wraps it: a mixture replaces modules of the tree
    it is given, in place."""
    if not isinstance(base, nn.Module):
        raise TypeError(f"shared_copy: base: expected a torch nn.Module (a causal LM), got {type(base).__name__}")
    if any(type(m).__name__ == "XLoraLinear" for m in base.modules()):
        raise ValueError("shared_copy: this base is already wrapped by a mixture; copy the plain base first")
    memo: dict[int, object] = {}
    for p in base.parameters():
        if type(p) is nn.Parameter and p.is_floating_point():
            memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)  # same storage, own object
        else:
            memo[id(p)] = p
    for b in base.buffers():
        memo[id(b)] = b
    return copy.deepcopy(base, memo)
