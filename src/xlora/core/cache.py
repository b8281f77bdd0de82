"""KV-cache keyword names across transformers versions."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """Pass a KV cache under the name this transformers version uses (`cache`, formerly `past_key_values`)."""
    params = inspect.signature(type(module).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return {name: cache, "use_cache": cache is not None}
